"""Stop `mmdialog train` at random moments, with SIGTERM (a scheduler's notice:
the run finishes its step, checkpoints and exits 143) or SIGKILL (a crash: the
last periodic checkpoint is all there is), mixed at random, resume each time,
and check that nothing was lost: every checkpoint stays intact and the final
weights equal those of an uninterrupted run (deterministic resume), bit for bit.

    python benchmarks/fault_injection.py --kills 20 --steps 30

Prints one JSON object: kills (SIGTERMs and SIGKILLs), resumes, damaged
checkpoints found, fallbacks to the previous checkpoint, both weight digests
and whether they are equal.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "mmdialog" / "core" / "data" / "demo" / "chat.jsonl"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def command(out: Path, steps: int, resume: bool, every: int) -> list[str]:
    return [sys.executable, "-m", "mmdialog", "train", "--data", str(DEMO), "--set", "data.split=train",
            "--set", "data.both_speakers=false", "--set", f"train.checkpoint_every={every}",
            "--max-steps", str(steps), "--quiet", "--out-dir", str(out), *(["--resume", "last"] if resume else [])]


def digest(out: Path) -> str:
    return json.loads((out / "manifest_rank0.json").read_text())["weights_sha1"]


def checkpoint_state(out: Path) -> tuple[int | None, bool]:
    """(global step of last.ckpt, whether it is damaged: truncated or not matching its digest), read safely."""
    sys.path.insert(0, str(ROOT))
    from mmdialog.core.checkpoint import is_intact, safe_load

    last = out / "checkpoints" / "last.ckpt"
    if not last.exists():
        return None, False
    if not is_intact(last):
        return None, True
    return int(safe_load(last)["global_step"]), False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of the whole run")
    ap.add_argument("--max-delay", type=float, default=4.0, help="seconds after a new checkpoint before the kill")
    ap.add_argument("--sigterm-share", type=float, default=0.5, help="chance that a kill is a SIGTERM, not a SIGKILL")
    ap.add_argument("--checkpoint-every", type=int, default=2,
                    help="steps between periodic checkpoints (above 1, a SIGTERM's checkpoint is its own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = args.out or Path(tempfile.mkdtemp(prefix="mmdialog-faults-"))
    full, faulty = root / "uninterrupted", root / "interrupted"
    t0 = time.perf_counter()
    every = args.checkpoint_every
    subprocess.run(command(full, args.steps, False, every), env=ENV, check=True, capture_output=True, cwd=ROOT)
    uninterrupted_s = time.perf_counter() - t0

    kills = resumes = corrupt = fallbacks = 0
    sent = {"SIGTERM": 0, "SIGKILL": 0}
    last_step = None
    while kills < args.kills:
        step, damaged = checkpoint_state(faulty)
        corrupt += damaged
        proc = subprocess.Popen(command(faulty, args.steps, step is not None or damaged, every), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        resumes += step is not None or damaged
        # Wait for the run to move past the checkpoint it resumed from, then kill at a random moment.
        ckpt = faulty / "checkpoints" / "last.ckpt"
        seen = ckpt.stat().st_mtime if ckpt.exists() else 0.0
        while proc.poll() is None and (not ckpt.exists() or ckpt.stat().st_mtime == seen):
            time.sleep(0.05)
        time.sleep(rng.uniform(0, args.max_delay))
        if proc.poll() is not None:  # it finished before the kill: start over from scratch
            _, err = proc.communicate()
            fallbacks += "previous checkpoint" in err
            if proc.returncode != 0:
                raise SystemExit(f"training failed:\n{err[-2000:]}")
            last_step = args.steps
            break
        sig = signal.SIGTERM if rng.random() < args.sigterm_share else signal.SIGKILL
        proc.send_signal(sig)
        _, err = proc.communicate()
        fallbacks += "previous checkpoint" in err
        # 143: stopped after its step, with a checkpoint. 0 or -15: it had just finished its last step
        # (-15: the handler was already given back while it wrote trainable.pt, which is atomic).
        if sig == signal.SIGTERM and proc.returncode not in (0, 128 + signal.SIGTERM, -signal.SIGTERM):
            raise SystemExit(f"SIGTERM: exit {proc.returncode}, not 143:\n"
                             f"{err[-2000:]}")
        sent[sig.name] += 1
        kills += 1
        step, damaged = checkpoint_state(faulty)
        last_step = step
    if last_step != args.steps:
        out = subprocess.run(command(faulty, args.steps, True, every), env=ENV, capture_output=True, text=True,
                             cwd=ROOT)
        resumes += 1
        fallbacks += "previous checkpoint" in out.stderr
        if out.returncode != 0:
            raise SystemExit(f"the final resume failed:\n{out.stderr[-2000:]}")
    a, b = digest(full), digest(faulty)
    samples = len(json.loads((faulty / "manifest_rank0.json").read_text())["samples"])
    print(json.dumps({"kills": kills, "sigterms": sent["SIGTERM"], "sigkills": sent["SIGKILL"], "resumes": resumes,
                      "steps": args.steps, "corrupt_checkpoints": corrupt,
                      "fallbacks_to_previous": fallbacks, "digest_uninterrupted": a, "digest_resumed": b,
                      "digest_equal": a == b, "samples_in_manifest": samples,
                      "uninterrupted_s": round(uninterrupted_s, 1), "total_s": round(time.perf_counter() - t0, 1),
                      "out": str(root)}, indent=2))


if __name__ == "__main__":
    main()
