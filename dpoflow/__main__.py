"""`python -m dpoflow` is the `dpoflow` command."""

from dpoflow.flows.cli import main

if __name__ == "__main__":
    main()
