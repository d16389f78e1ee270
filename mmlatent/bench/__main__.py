"""``python -m mmlatent.bench``: the benchmark's command line (see ``mmlatent.bench.command``); the CPU memory
probe re-invokes it in a fresh process."""
import sys

from mmlatent.bench.command import main

sys.exit(main())
