"""`python -m dpoflow` is the `dpoflow` command."""

from dpoflow.flows.cli import main

if __name__ == "__main__":
    raise SystemExit(main())  # the exit status: 2 for a user error, 1 for a fault
