"""`python -m spamkiller` is the same as the `spam-killer` command."""

from spamkiller.cli import main

if __name__ == "__main__":
    main()
