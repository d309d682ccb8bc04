"""`python -m experts.worker`: the public entry point of a miner process (see `experts.remote.worker`)."""

from experts.remote.worker import main

if __name__ == "__main__":
    main()
