"""From the submission plan to Kaggle: render kernels, dry-run one, build and push the datasets, push, submit.

Usage (the Makefile's targets call these):
    python scripts/submissions.py render [--variant SLUG]         # build/kernels/<slug>/ (no credentials needed)
    python scripts/submissions.py render-local --variant SLUG # execute one rendered kernel here (configs/local-inputs.yaml)
    python scripts/submissions.py push-lib | push-wheels
    python scripts/submissions.py push-adapters [--variant SLUG]   # runs/<adapter>/selected/ of the plan (or one variant)
    python scripts/submissions.py wheels                          # pip download of requirements-kaggle.txt (GBs)
    python scripts/submissions.py push [--variant SLUG]           # render with your user, then kaggle kernels push
    python scripts/submissions.py status [--variant SLUG]
    python scripts/submissions.py submit --variant SLUG [--version N]

Every command that talks to Kaggle checks for credentials first and stops, having written nothing, without them.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

import kaggle_utils
from kaggle_utils import config, kaggle_api, kernels
from kaggle_utils.plan import DEFAULT_PLAN, load_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["render", "render-local", "push-lib", "push-adapters", "wheels",
                                            "push-wheels", "push", "status", "submit"])
    parser.add_argument("--plan", default=DEFAULT_PLAN, help="the submission plan (YAML)")
    parser.add_argument("--variant", default="", help="one variant's slug (default: all; required by render-local, submit)")
    parser.add_argument("--settings", default=kernels.DEFAULT_LOCAL_SETTINGS, help="render-local: /kaggle path mapping")
    parser.add_argument("--version", type=int, default=None, help="submit: the kernel version (default: the last push)")
    parser.add_argument("--python", default="3.12", help="wheels: Kaggle's Python version")
    parser.add_argument("--runs", default="runs", help="push-adapters: where runs/<adapter>/selected/ live")
    args = parser.parse_args(argv)
    config.setup_logging()
    from papermill.exceptions import PapermillExecutionError

    try:
        return _run(args)
    except (config.ConfigError, kaggle_api.CredentialsError, kaggle_api.KaggleCommandError, FileNotFoundError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PapermillExecutionError as e:
        print(f"error: the kernel failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
              f"the executed notebook is in {kernels.LOCAL_DIR}/{args.variant}/", file=sys.stderr)
        return 1


def _run(args) -> int:
    cmd = args.command
    plan = load_plan(args.plan)
    # Phase 1: anything that reaches Kaggle checks credentials before it writes a single file.
    if cmd in ("push-lib", "push-adapters", "push-wheels", "push", "status", "submit"):
        kaggle_api.require_credentials(f"`make {cmd}`")
        user = kaggle_api.resolve_user(plan, required=True)
    else:
        user = kaggle_api.resolve_user(plan)
    if cmd in ("render-local", "submit") and not args.variant:
        raise config.ConfigError(f"variant: {cmd} needs VARIANT=<slug>; planned: "
                                 f"{', '.join(v.slug for v in plan.variants)}")

    # Phase 2: build, then (for the push commands) upload.
    if cmd == "render":
        kernels.render(plan, user, slug=args.variant)
    elif cmd == "render-local":
        path = kernels.run_local(plan, args.variant, kernels.load_local_settings(args.settings), user=user)
        print(f"dry run ok: {path}")
    elif cmd == "push-lib":
        folder = kaggle_api.build_library_dataset(user)
        kaggle_api.push_dataset(folder, f"kaggle_utils {kaggle_utils.__version__} at {kaggle_api.commit_stamp()}")
    elif cmd == "push-adapters":
        folder = kaggle_api.build_adapters_dataset(plan, user, runs_dir=args.runs, slug=args.variant)
        kaggle_api.push_dataset(folder, f"adapters at {kaggle_api.commit_stamp()}")
    elif cmd == "wheels":
        subprocess.run(kaggle_api.wheels_download_command(python_version=args.python), check=True)
        print(f"wheels ready: {kaggle_api.write_wheels_metadata(plan, user)}")
    elif cmd == "push-wheels":
        folder = config.resolve_path(kaggle_api.WHEELS_DIR)
        if not (folder / "dataset-metadata.json").exists():
            raise FileNotFoundError(f"{folder} has no wheels yet: run `make wheels` first")
        kaggle_api.set_dataset_owner(folder, user)
        kaggle_api.push_dataset(folder, "GPU wheels")
    elif cmd == "push":
        for folder in kernels.render(plan, user, slug=args.variant):
            version = kaggle_api.push_kernel(folder)
            print(f"pushed {user}/{folder.name} version {version}")
        print("next: `make status`, then `make submit VARIANT=<slug>` once a run has finished")
    elif cmd == "status":
        for v in plan.select(args.variant):
            kaggle_api.kernel_status(f"{user}/{v.slug}")
    elif cmd == "submit":
        variant = plan.variant(args.variant)
        version = args.version or kaggle_api.pushed_version(variant.slug)
        if not version:
            raise config.ConfigError(f"version: no recorded push of '{variant.slug}'; pass VERSION=<n> "
                                     "(the number `make push` printed)")
        kaggle_api.submit_kernel(f"{user}/{variant.slug}", version,
                                 f"{variant.title} v{version} (kaggle_utils {kaggle_utils.git_commit()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
