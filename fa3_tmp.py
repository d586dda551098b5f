from manualgrad.registry import ops
from manualgrad.testing import check

bad = []
for seed in range(0, 20):
    for op in ops():
        r = check(op.name, seed=seed)
        if not r.ok:
            bad.append((seed, op.name, [(x.name, x.message[:150]) for x in r.failed]))
print("false alarms over seeds 0-19 (kink values):", bad)
