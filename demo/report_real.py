"""Prints the real-data demo's table: RUNS_DIR, then LABEL=RUN_DIR_NAME for each row, from
each run's eval.json (validation: the final model; test: the model the job chose)."""
import json
import os
import sys

runs = sys.argv[1]
print(f"{'model':<42} {'val (final)':>11} {'test':>7}  test model")
for arg in sys.argv[2:]:
    label, name = arg.rsplit("=", 1)
    try:
        r = json.load(open(os.path.join(runs, name, "eval.json")))
    except OSError:
        print(f"{label:<42} {'-':>11} {'-':>7}  (no eval.json: the job failed; ferryctl logs {name})")
        continue
    val, test = r.get("val", {}), r.get("test", {})
    pct = lambda d: f"{d['top1'] * 100:.1f}%" if "top1" in d else "-"
    print(f"{label:<42} {pct(val):>11} {pct(test):>7}  {test.get('model', '')}")
