"""Hashes of adapt() outputs on tiny cases (before/after the split of nn/adapt.py, issue 23).

Usage: PYTHONPATH=<checkout> python scripts/adapt_hashes.py OUT.json <checkout>/tests/nn; compare the JSON
files of the old and the new checkout (χ of every scan, the model weights, history without timings, info).
"""
import hashlib, json, sys, tempfile
from pathlib import Path
import numpy as np
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])  # tests/nn for nn_test_helpers
import napari_qsm
from napari_qsm.nn.adapt import AdaptParams, adapt, save_adapted
from nn_test_helpers import blob_scan, tiny_checkpoint
print("using", napari_qsm.__file__, file=sys.stderr)
SMALL_HEAD = ((32, 40, 32), (4.5, 4.5, 4.5))


def h(a):
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.tobytes()).hexdigest()[:20]


def digest(res):
    out = {"chis": [h(c) for c in res.chis], "chi": h(res.chi), "step": res.step,
           "model": h(np.concatenate([v.detach().cpu().double().numpy().ravel() for v in res.model.state_dict().values()])),
           "history": json.dumps([{k: v for k, v in r.items() if "seconds" not in k} for r in res.history]),
           "info": json.dumps({k: (h(v.numpy()) if isinstance(v, torch.Tensor) else str(v).replace(str(tmp), "TMP")) for k, v in res.info.items()
                               if k != "predict"}, sort_keys=True, default=str)}
    return out


tmp = Path(tempfile.mkdtemp())
base = tiny_checkpoint(tmp / "tiny_plus_tkd.pt", tkd_delta=0.1, head_std=0.05)
s1, s2 = blob_scan(0)[0], blob_scan(1)[0]
P = dict(patch=32, synth_patch=32, lr=3e-3, seed=0)
res = {}
kw = dict(weights=base, device="cpu", synth_regime=SMALL_HEAD)
res["dsbn_keepmean"] = digest(r := adapt(s1, AdaptParams(steps=3, **P), **kw))
save_adapted(r, tmp / "a.pt", scan=s1)
# resume from a 3-step run to 5 steps
res["dsbn_resume"] = digest(adapt(s1, AdaptParams(steps=5, **P), device="cpu", synth_regime=SMALL_HEAD,
                                  resume=tmp / "a.pt"))
res["finetune"] = digest(adapt(s1, AdaptParams(steps=3, mode="finetune", **P), **kw))
res["uqsm"] = digest(adapt(s1, AdaptParams(steps=3, mode="uqsm", **P), **kw))
res["dsbn_nomean_tvfollow_bn"] = digest(adapt(s1, AdaptParams(steps=3, keep_mean=False, tv_follow=True,
                                                              update="bn", preview_every=2, **P), **kw))
res["protocol"] = digest(adapt([s1, s2], AdaptParams(steps=3, scan_batch=2, **P), **kw))
res["smv0"] = digest(adapt(s1, AdaptParams(steps=2, smv_mm=0, **P), **kw))
json.dump(res, open(sys.argv[1], "w"), indent=1, sort_keys=True)
print("done", file=sys.stderr)
