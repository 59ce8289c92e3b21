"""Start-up time of the command line, as a ratio to the bare interpreter in the same run.

    python bench/bench_startup.py [--repeat 30]

Both sides run with the interpreter sl-forgery is installed for (the console script's own), so the ratio measures
sl-forgery, not the interpreter. `import argparse` alone is shown as the floor any argparse program starts from.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from common import median_seconds, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    script = shutil.which("sl-forgery", path=os.path.dirname(sys.executable)) or shutil.which("sl-forgery")
    if not script:
        sys.exit("sl-forgery is not installed: pip install .")
    python = open(script).readline()[2:].strip()

    def timed(argv: list[str]) -> float:
        def run() -> None:
            subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)

        run()
        return median_seconds(run, args.repeat)

    baseline = timed([python, "-c", "pass"])
    floor = timed([python, "-c", "import argparse"])
    help_time = timed([script, "--help"])
    completion = timed([script, "completion", "bash"])
    print_table(
        f"start-up, median of {args.repeat} ({python})",
        [
            ("python -c pass", baseline, "s", 1.0, "itself"),
            ("python -c 'import argparse' (floor)", floor, "s", floor / baseline, "python -c pass"),
            ("sl-forgery --help", help_time, "s", help_time / baseline, "python -c pass (target <= 1.6x)"),
            ("sl-forgery completion bash", completion, "s", completion / baseline, "python -c pass (target <= 1.6x)"),
        ],
    )


if __name__ == "__main__":
    main()
