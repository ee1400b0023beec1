"""End to end: the README's demo command, verbatim, in a fresh clone with an empty home (nothing cached).

    python -m benchmarks.demo                 # clones HEAD of this repository into /tmp/taskprune-demo (20-30 min)

What a new user does: ``git clone``, then the first command of the README (new virtualenv, ``pip install``, build of
the multi-task model because nothing is cached, calibrate + prune, test). ``HOME`` points at an empty folder, so
there is no pip, Hugging Face or taskprune cache; the machine's pip configuration (``/etc``) stays. The command is run
as written, with only a timestamp ``echo`` between its ``&&`` segments, so the wall time of each part is measured:
setup (venv + pip), ``fit`` (which includes the one-time build; its own time comes from the model's ``build.json``)
and ``test``. Writes ``benchmarks/results/demo.md`` (phases, build record, the printed table) and keeps the full
timestamped log next to the clone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import header, write_text

MARK = "@@taskprune-demo-segment"


def readme_demo_command(readme: Path) -> str:
    """The first line of the first ```bash block of the README (the demo command)."""
    m = re.search(r"```bash\n(.+?)\n```", readme.read_text(), re.S)
    if m is None:
        raise SystemExit(f"no ```bash block in {readme}")
    return m.group(1).strip()


def clean_env(home: Path) -> dict[str, str]:
    """This process's environment minus any active virtualenv and taskprune / Hugging Face settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TASKPRUNE_", "HF_", "TRANSFORMERS_", "VIRTUAL_ENV", "PYTHON"))}
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(venv))
    env.update(HOME=str(home), COLUMNS="150", XDG_CACHE_HOME=str(home / ".cache"), PYTHONUNBUFFERED="1")
    return env


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=".", help="repository to clone (its HEAD commit)")
    p.add_argument("--workdir", default="/tmp/taskprune-demo", help="emptied, then holds clone/, home/ and demo.log")
    p.add_argument("--out", default="benchmarks/results/demo.md")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    clone, home = work / "clone", work / "home"
    home.mkdir(parents=True)
    subprocess.run(["git", "clone", "--quiet", str(Path(args.repo).resolve()), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()
    command = readme_demo_command(clone / "README.md")
    segments = command.split(" && ")
    script = " && ".join(f"{s} && echo {MARK} {i} $(date +%s.%N)" for i, s in enumerate(segments))
    load0 = os.getloadavg()
    t0 = time.time()
    log_lines, marks = [], []
    with subprocess.Popen(["bash", "-c", script], cwd=clone, env=clean_env(home), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(MARK):
                marks.append((int(line.split()[1]), float(line.split()[2]) - t0))
            log_lines.append(f"[{time.time() - t0:7.1f}s] {line}")
    rc = proc.returncode
    total = time.time() - t0
    load1 = os.getloadavg()
    (work / "demo.log").write_text("\n".join(log_lines) + "\n")

    ends = dict(marks)
    rows, prev = [], 0.0
    for i, seg in enumerate(segments):
        if i in ends:
            rows.append((seg, ends[i] - prev))
            prev = ends[i]
        else:
            rows.append((seg, None))
    build = {}
    build_json = home / ".cache" / "taskprune" / "minilm-glue" / "build.json"
    if build_json.is_file():
        build = json.loads(build_json.read_text())
    # the printed table: the test segment's output from its first table line on
    test_start = ends.get(len(segments) - 2, 0.0)
    test_out = [ln.split("] ", 1)[1] for ln in log_lines
                if float(ln[1:8]) >= test_start and not ln.split("] ", 1)[1].startswith(MARK)]
    first = next((i for i, ln in enumerate(test_out) if re.match(r"\s*[┏╭+|]", ln)), max(0, len(test_out) - 40))

    out = [f"# The README demo, end to end on a fresh clone (commit `{commit}`)\n",
           f"Command (the README's first, verbatim; run in `{clone}` with `HOME={home}`, nothing cached):\n",
           f"```bash\n{command}\n```\n",
           f"Exit status **{rc}**, total wall time **{total / 60:.1f} min**; load average "
           f"{load0[0]:.2f} at the start, {load1[0]:.2f} at the end (1-minute).\n",
           "| segment | wall time |", "|---|---|"]
    out += [f"| `{s}` | {'—' if t is None else f'{t:.0f} s'} |" for s, t in rows]
    if build:
        out += ["", f"The `fit` segment includes the one-time build of the multi-task model: **{build['build_seconds']:.0f} s** "
                f"({build['train_seconds']:.0f} s training incl. loading; recipe `{build['recipe_hash']}`, "
                f"{sum(build['rows_per_task'].values())} train rows from the {build['data_source']} data, "
                f"{build['torch_threads']} torch threads). Calibrate + prune + test after the build: "
                f"**{(sum(t for _, t in rows[-2:] if t is not None) - build['build_seconds']) / 60:.1f} min**."]
    out += ["", "What the `test` segment printed:\n", "```", *test_out[first:], "```"]
    write_text(args.out, header("demo", argv) + "\n".join(out) + "\n")
    print(f"rc {rc}, {total:.0f} s; wrote {args.out} and {work / 'demo.log'}")
    if rc != 0:
        raise SystemExit(rc)


if __name__ == "__main__":
    main()
