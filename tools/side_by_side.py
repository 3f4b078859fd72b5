"""Side by side in one process: this checkout's sampler and training step against another
checkout's (the issue #14 configuration: dim 256, 8 layers, 8 heads, vocabulary 1024, 16x16
tokens, batch 16, guidance 4, float32), same weights, interleaved rounds; prints the ratios and
writes JSON. Both trees are imported under the package name `arpg` by swapping `sys.modules`.

    git worktree add /tmp/arpg_base ac63d5a
    BASE=/tmp/arpg_base NEW=. THREADS=2 ROUNDS=5 OUT=side_by_side.json python tools/side_by_side.py

A development tool (not part of the library): the base tree must expose `arpg.model` (before the
models/ package) or `arpg.models`, and `arpg.sample.generate`.
"""
import importlib, json, os, statistics, sys, time
import torch

BASE, NEW = os.environ["BASE"], os.environ.get("NEW", ".")
THREADS = int(os.environ.get("THREADS", "2"))
ROUNDS = int(os.environ.get("ROUNDS", "5"))
torch.set_num_threads(THREADS)


def load(root):
    sys.path.insert(0, root)
    for n in [m for m in sys.modules if m == "arpg" or m.startswith("arpg.")]:
        del sys.modules[n]
    importlib.import_module("arpg.sample")
    importlib.import_module("arpg.models" if os.path.isdir(os.path.join(root, "arpg", "models")) else "arpg.model")
    mods = {n: sys.modules.pop(n) for n in [m for m in sys.modules if m == "arpg" or m.startswith("arpg.")]}
    sys.path.remove(root)
    return mods


base, new = load(BASE), load(NEW)
cfg = dict(dim=256, n_layer=8, n_head=8, vocab_size=1024, block_size=256, num_classes=1000)
torch.manual_seed(0)
m_new = new["arpg.models"].create_model("ARPG-tiny", **cfg)
for p in m_new.parameters():
    torch.nn.init.normal_(p, std=0.02)
m_base = base["arpg.model" if "arpg.model" in base else "arpg.models"].create_model("ARPG-tiny", **cfg)
m_base.load_state_dict(m_new.state_dict(), strict=True)
labels = torch.arange(16) % 1000


def sampler(mods, model, steps, **kw):
    model.eval()
    return lambda: mods["arpg.sample"].generate(model, labels, steps=steps, cfg=4.0, amp=False,
                                                generator=torch.Generator().manual_seed(0), **kw)


def trainer(model, check_kw):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    tokens, lab = torch.randint(0, 1024, (16, 256), generator=g), torch.randint(0, 1000, (16,), generator=g)

    def step():
        _, loss = model(tokens, lab, **check_kw)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(fn, n=1):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


results = {}
for label, make_base, make_new, n, units in [
    ("sample 64 steps", lambda: sampler(base, m_base, 64), lambda: sampler(new, m_new, 64), 1, 16),
    ("sample 32 steps", lambda: sampler(base, m_base, 32), lambda: sampler(new, m_new, 32), 1, 16),
    ("sample 256 steps", lambda: sampler(base, m_base, 256), lambda: sampler(new, m_new, 256), 1, 16),
    ("train step", lambda: trainer(m_base, {}), lambda: trainer(m_new, {"check": False}), 3, 16 * 256),
]:
    fb, fn = make_base(), make_new()
    fb(); fn()  # warm-up
    times = {"base": [], "new": []}
    for r in range(ROUNDS):
        for k, f in ((("base", fb), ("new", fn)) if r % 2 == 0 else (("new", fn), ("base", fb))):
            times[k].append(timed(f, n))
    med = {k: statistics.median(v) for k, v in times.items()}
    results[label] = {"base_s": med["base"], "new_s": med["new"], "ratio": med["base"] / med["new"],
                      "base_per_s": units / med["base"], "new_per_s": units / med["new"],
                      "unit": "tokens/s" if "train" in label else "images/s", "rounds": times}
    print(f"{label:18s} base {units / med['base']:9.1f}  new {units / med['new']:9.1f} {results[label]['unit']:9s} "
          f"ratio {med['base'] / med['new']:.2f}x", flush=True)
# sanity: same tokens at float32 (the fast path is exact up to float rounding order)
same = torch.equal(sampler(base, m_base, 64)(), sampler(new, m_new, 64)())
print("identical tokens at 64 steps:", same, "| load", os.getloadavg(), "| threads", THREADS)
json.dump({"config": {**cfg, "batch": 16, "cfg": 4.0, "threads": THREADS, "rounds": ROUNDS,
                      "base": os.path.abspath(BASE), "torch": torch.__version__,
                      "cpu": torch.backends.cpu.get_cpu_capability()},
           "identical_tokens_64": same, "results": results},
          open(os.environ.get("OUT", "side_by_side.json"), "w"), indent=1)
