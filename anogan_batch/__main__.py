"""`python -m anogan_batch` = the `anogan-batch` command."""

from anogan_batch.cli import main

if __name__ == "__main__":
    main()
