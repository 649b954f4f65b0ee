"""``python -m fastdense ...``: the same as the ``fastdense`` console script."""

from fastdense.cli.main import main

if __name__ == "__main__":
    main()
