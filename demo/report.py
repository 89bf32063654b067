"""Prints the demo's result table from `ferryctl get -o json` documents on stdin (one per line)."""
import json
import sys

rows = [json.loads(line) for line in sys.stdin if line.strip()]
print()
print(f"{'strategy':<22} {'job':<28} {'phase':<10} {'val accuracy':>12}")
labels = ["scratch", "feature extraction", "fine-tuning", "small, scratch", "small, distilled"]
for label, job in zip(labels, rows):
    acc = job["status"].get("val_accuracy")
    print(f"{label:<22} {job['name']:<28} {job['phase']:<10} {('%.2f%%' % (acc * 100)) if acc is not None else '-':>12}")
