"""The paper's experiment configs (configs/tofu, configs/muse, configs/wmdp): their settings, and a
two-step run of each through the CLI on a tiny model, with the hub served from tests/fixtures.

The hub is faked at `datasets.load_dataset`: every (dataset, config, split) a config names must be
one of HUB_FIXTURES (an unknown one fails the test), so these runs check the configs' hub names,
subsets and splits as well as the code path, without the network.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re

import pytest
import torch
import yaml
from conftest import save_tiny_model

from blur_lightning.cli import main
from blur_lightning.evals.muse import MUSE_AUC_RETRAIN

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

TOFU = {f"configs/tofu/llama3.2-1b_forget{n}_npo.yaml": n for n in ("01", "05", "10")}
MUSE = {"configs/muse/news_npo.yaml": ("News", 2.5e-5), "configs/muse/books_npo.yaml": ("Books", 1e-5)}
WMDP = {"configs/wmdp/zephyr-7b_rmu_cyber.yaml": "cyber", "configs/wmdp/zephyr-7b_rmu_bio.yaml": "bio"}
PAPER_CONFIGS = [*TOFU, *MUSE, *WMDP]


def _hub_fixtures() -> dict[tuple[str, str | None, str], str]:
    table: dict[tuple[str, str | None, str], str] = {}
    for n, retain in (("01", "99"), ("05", "95"), ("10", "90")):
        table["locuslab/TOFU", f"forget{n}", "train"] = "tofu/forget01.json"
        table["locuslab/TOFU", f"retain{retain}", "train"] = "tofu/retain_perturbed.json"
        table["locuslab/TOFU", f"forget{n}_perturbed", "train"] = "tofu/forget01_perturbed.json"
        table["locuslab/TOFU", f"holdout{n}", "train"] = "tofu/forget01.json"  # question, answer: as holdout{n}
    table["locuslab/TOFU", "retain_perturbed", "train"] = "tofu/retain_perturbed.json"
    table["locuslab/TOFU", "real_authors_perturbed", "train"] = "tofu/real_authors_perturbed.json"
    table["locuslab/TOFU", "world_facts_perturbed", "train"] = "tofu/world_facts_perturbed.jsonl"
    for corpus in ("News", "Books"):
        repo = f"muse-bench/MUSE-{corpus}"
        table[repo, "raw", "forget"] = "muse/raw_forget.jsonl"
        table[repo, "raw", "retain1"] = "muse/privleak_holdout.json"  # any other text serves as retain
        table[repo, "verbmem", "forget"] = "muse/verbmem_forget.json"
        table[repo, "knowmem", "forget_qa"] = "muse/knowmem_forget_qa.json"
        table[repo, "knowmem", "retain_qa"] = "muse/knowmem_retain_qa.json"
        table[repo, "knowmem", "forget_qa_icl"] = "muse/knowmem_forget_qa_icl.json"
        table[repo, "knowmem", "retain_qa_icl"] = "muse/knowmem_forget_qa_icl.json"
        table[repo, "privleak", "forget"] = "muse/raw_forget.jsonl"
        table[repo, "privleak", "holdout"] = "muse/privleak_holdout.json"
    table["cais/wmdp-corpora", "cyber-forget-corpus", "train"] = "wmdp/cyber-forget-corpus.jsonl"
    table["cais/wmdp-bio-forget-corpus", None, "train"] = "wmdp/cyber-forget-corpus.jsonl"
    table["Salesforce/wikitext", "wikitext-2-raw-v1", "test"] = "muse/raw_forget.jsonl"
    for subset in ("wmdp-bio", "wmdp-cyber"):
        table["cais/wmdp", subset, "test"] = "wmdp/wmdp-bio.json"
    table["cais/mmlu", "all", "test"] = "wmdp/mmlu.json"  # with a subject column
    return table


HUB_FIXTURES = _hub_fixtures()


@pytest.fixture
def fake_hub(monkeypatch):
    """Serve hub datasets from the fixtures; returns the list of (dataset, config, split) requested."""
    import datasets

    real = datasets.load_dataset
    requested: list[tuple[str, str | None, str]] = []

    def load_dataset(path, name=None, *args, split=None, **kwargs):
        if path in ("json", "csv", "parquet") or kwargs.get("data_files") is not None or os.path.exists(path):
            return real(path, name, *args, split=split, **kwargs)
        key = (path, name, split)
        if key not in HUB_FIXTURES:
            raise AssertionError(f"a config asks the hub for {key}, which no fixture stands for")
        requested.append(key)
        return real("json", data_files=os.path.join(FIXTURES, HUB_FIXTURES[key]), split="train")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return requested


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """8 decoder layers: the WMDP configs' rmu_layer 7 and layers 5-7 regex apply unchanged."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model_8_layers"), layers=8)


def parsed_config(config: str, capsys, *overlays: str) -> dict:
    args = ["fit", "--config", os.path.join(ROOT, config)]
    for overlay in overlays:
        args += ["--config", os.path.join(ROOT, overlay)]
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def global_batch(cfg: dict) -> int:
    """Rows (pairs) per optimizer step over all ranks: per micro-batch x accumulation x ranks."""
    trainer, per_rank = cfg["trainer"], cfg["data"]["batch_size"] * cfg["model"]["accumulate_grad_batches"]
    return per_rank * trainer["devices"] * trainer["num_nodes"]


# Many-GPU overlays (configs/scale/): each base config with each overlay of its benchmark.
SCALE = {
    "configs/scale/tofu_8gpu.yaml": (TOFU, 8), "configs/scale/tofu_2x8gpu.yaml": (TOFU, 16),
    "configs/scale/muse_8gpu.yaml": (MUSE, 8), "configs/scale/muse_2x8gpu.yaml": (MUSE, 16),
    "configs/scale/wmdp_4gpu.yaml": (WMDP, 4),
}  # fmt: skip
SCALED = [(base, overlay) for overlay, (bases, _) in SCALE.items() for base in bases]


def test_every_scale_overlay_is_listed():
    found = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "scale", "*.yaml")))
    assert found == sorted(SCALE)


@pytest.mark.parametrize("base,overlay", SCALED)
def test_scale_overlays_keep_the_global_batch(base, overlay, capsys):
    """On 4, 8 or 16 GPUs a paper config takes the rows per step its 1-GPU form takes (the authors'), under
    FSDP2 (HSDP across nodes), with everything else, precision and schedule included, unchanged."""
    one, many = parsed_config(base, capsys), parsed_config(base, capsys, overlay)
    ranks = many["trainer"]["devices"] * many["trainer"]["num_nodes"]
    assert (one["trainer"]["devices"], one["trainer"]["num_nodes"], ranks) == (1, 1, SCALE[overlay][1])
    assert global_batch(many) == global_batch(one)
    assert many["trainer"]["strategy"]["class_path"] == "blur_lightning.distributed.fsdp.FSDP2Strategy"
    assert many["trainer"]["strategy"]["init_args"]["sharding"] == ("hybrid" if many["trainer"]["num_nodes"] > 1
                                                                     else "full")  # fmt: skip
    for section, keep in (("trainer", {"precision", "max_epochs", "max_steps"}), ("model", {"optimizer", "scheduler"})):
        assert {k: many[section][k] for k in keep} == {k: one[section][k] for k in keep}


def eval_callback(cfg: dict) -> dict:
    (entry,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EvaluationCallback")]
    return entry["init_args"]


# ============================================================================ the paper's settings
@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_settings(config, capsys):
    cfg = parsed_config(config, capsys)
    model, data, trainer = cfg["model"], cfg["data"], cfg["trainer"]
    lr = model["optimizer"]["init_args"]["lr"]
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
    if config in TOFU:  # a 1B model: fp32 master weights fit (pure bf16 rounds lr-1e-5 updates away)
        assert (model["model_dtype"], trainer["precision"]) == ("float32", "bf16-mixed")
    else:  # 7B on one GPU: bf16 weights, as RMU trains
        assert (model["model_dtype"], trainer["precision"]) == ("bfloat16", "bf16-true")
    assert eval_callback(cfg)["benchmark"] == config.split("/")[1]
    # The eval callback comes last: --trainer.callbacks.init_args.* (tests, users) overrides the last one
    assert trainer["callbacks"][-1]["class_path"] == "blur_lightning.evals.callback.EvaluationCallback"
    if config in TOFU:
        n = TOFU[config]
        assert model["model"] == "meta-llama/Llama-3.2-1B-Instruct"
        assert (model["forget_loss"], model["retain_loss"], model["mode"]) == ("npo", "nll", "forget_lower")
        assert (model["gamma"], lr, trainer["max_epochs"]) == (1.0, 1e-5, 10)
        assert (data["batch_size"], model["accumulate_grad_batches"]) == (4, 8)
        assert (data["forget_path"], data["forget_subset"]) == ("locuslab/TOFU", f"forget{n}")
        assert (data["retain_path"], data["retain_subset"]) == ("locuslab/TOFU", f"retain{100 - int(n)}")
        assert eval_callback(cfg)["splits"]["forget"] == f"hub:forget{n}_perturbed"
    elif config in MUSE:
        corpus, paper_lr = MUSE[config]
        assert model["model"] == f"muse-bench/MUSE-{corpus}_target"
        assert (model["forget_loss"], model["retain_loss"], model["mode"]) == ("npo", "nll", "forget_lower")
        assert (model["gamma"], lr, trainer["max_epochs"]) == (1.0, paper_lr, 10)
        assert data["format"] == "text" and data["forget_path"] == data["retain_path"] == f"muse-bench/MUSE-{corpus}"
        assert (data["forget_subset"], data["forget_split"], data["retain_split"]) == (
            "raw",
            "forget",
            "retain1",
        )
        assert eval_callback(cfg)["options"]["corpus"] == corpus.lower()
        # PrivLeak against MUSE's own retrained model (muse_bench: News 0.4772, Books 0.5393)
        assert eval_callback(cfg)["options"]["auc_retrain"] == MUSE_AUC_RETRAIN[corpus.lower()]
    else:
        assert model["model"] == "HuggingFaceH4/zephyr-7b-beta"
        assert (model["forget_loss"], model["retain_loss"], model["mode"]) == ("rmu", "rmu", "rmu")
        assert (model["alpha"], lr, trainer["max_steps"]) == (800.0, 5e-5, 150)
        assert (model["rmu_layer"], model["rmu_steering_coef"], data["batch_size"]) == (7, 6.5, 4)
        assert data["format"] == "text" and data["retain_path"] == "Salesforce/wikitext"
        assert WMDP[config] in data["forget_path"] + str(data["forget_subset"])
        # RMU's --layer_ids 5,6,7 --param_ids 6: the MLP down-projection of layers 5-7, nothing else
        regex = re.compile(model["trainable_params"])
        mistral = [f"model.layers.{i}.{p}.weight" for i in range(32) for p in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
        )] + ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]  # fmt: skip
        trained = [name for name in mistral if regex.search(name)]
        assert trained == [f"model.layers.{i}.mlp.down_proj.weight" for i in (5, 6, 7)]


TOFU_FORGET_ROWS = {"01": 40, "05": 200, "10": 400}  # locuslab/TOFU forget01 / 05 / 10


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_optimizer_and_schedule(config, capsys):
    """The authors' optimizer settings and lr schedule (docs/PAPER_CONFIGS.md). TOFU: 32 pairs a step
    (their 4 x 4 x 2 GPUs), one warm-up epoch from 0, linear decay to 0 at the last of 10 epochs;
    MUSE and WMDP: constant lr, no weight decay."""
    cfg = parsed_config(config, capsys)
    model, data, trainer = cfg["model"], cfg["data"], cfg["trainer"]
    optimizer = model["optimizer"]["init_args"]
    lr = optimizer["lr"]
    if config not in TOFU:
        assert optimizer["weight_decay"] == 0.0
        assert model["scheduler"] is None
        if config in MUSE:
            assert data["batch_size"] * model["accumulate_grad_batches"] == 32  # the authors' 4 x 8 GPUs
            assert model["npo_beta"] == {"News": 0.05, "Books": 0.4}[MUSE[config][0]]  # the paper's tables
        return
    assert optimizer["weight_decay"] == 0.01
    assert data["batch_size"] * model["accumulate_grad_batches"] * trainer["devices"] == 32
    scheduler = model["scheduler"]
    assert scheduler["class_path"] == "blur_lightning.training.schedules.LinearWarmupDecay"
    args = scheduler["init_args"]
    assert (args["warmup_steps"], args["warmup_epochs"], args["total_steps"]) == (None, 1.0, "auto")
    from blur_lightning.training.schedules import LinearWarmupDecay
    from blur_lightning.training.step_count import OptimizerSteps

    # What the module resolves it to at fit start on the config's one device: the forget rows in
    # micro-batches of 4, windows of 8, the last partial window a step too
    rows = TOFU_FORGET_ROWS[TOFU[config]]
    steps_per_epoch = math.ceil(rows / 32)
    count = OptimizerSteps(
        math.ceil(rows / data["batch_size"]), model["accumulate_grad_batches"], trainer["max_epochs"], None
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = LinearWarmupDecay(opt, **args)
    schedule.resolve(count.per_epoch, count.total)
    assert (schedule.warmup_steps, schedule.total_steps) == (steps_per_epoch, trainer["max_epochs"] * steps_per_epoch)
    args = {"warmup_steps": schedule.warmup_steps, "total_steps": schedule.total_steps}
    lrs = []
    for _ in range(args["total_steps"]):
        lrs.append(opt.param_groups[0]["lr"])  # the lr this optimizer step uses
        opt.step()
        schedule.step()
    assert lrs[0] == 0.0  # the Trainer's warm-up starts at 0
    assert lrs[args["warmup_steps"]] == pytest.approx(lr, rel=1e-12)  # the peak right after the warm-up
    assert max(lrs) == pytest.approx(lr, rel=1e-12)
    assert lrs[-1] == pytest.approx(lr / (args["total_steps"] - args["warmup_steps"]), rel=1e-9)  # last step
    assert opt.param_groups[0]["lr"] == 0.0  # decayed to 0 at the end
    assert all(a >= b for a, b in zip(lrs[args["warmup_steps"]:], lrs[args["warmup_steps"] + 1:]))


def test_linear_warmup_decay_refuses_bad_lengths():
    from blur_lightning.training.schedules import LinearWarmupDecay

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps=5, total_steps=5"):
        LinearWarmupDecay(opt, warmup_steps=5, total_steps=5)


# ============================================================================ two steps on a tiny model
def tiny_args(config: str, model_dir: str, root: str) -> list[str]:
    return [
        "--config", os.path.join(ROOT, config),
        "--model.model", model_dir,
        "--model.model_dtype", "float32",
        "--model.export_dir", "null",
        "--trainer.precision", "32-true",
        "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "2",
        "--trainer.check_val_every_n_epoch", "2",  # one optimizer step per epoch here: validate at step 2
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", root,
        "--trainer.logger.init_args.save_dir", root,
        "--trainer.callbacks.init_args.max_new_tokens", "4",
        "--trainer.callbacks.init_args.batch_size", "4",
        "--trainer.callbacks.init_args.max_rows", "2",
        "--data.batch_size", "2",
        "--data.max_length", "128",
    ]  # fmt: skip


def expected_requests(cfg: dict) -> set[tuple]:
    data = cfg["data"]
    wanted = {
        (data["forget_path"], data["forget_subset"], data["forget_split"] or data["split"]),
        (data["retain_path"], data["retain_subset"], data["retain_split"] or data["split"]),
    }
    return wanted


def assert_metric_ranges(benchmark: str, metrics: dict[str, float]) -> None:
    assert metrics, "no metrics"
    for key, value in metrics.items():
        assert math.isfinite(value), f"{key} = {value}"
        if key != "privleak":  # PrivLeak is a signed percentage; everything else is a fraction
            assert 0.0 <= value <= 1.0, f"{key} = {value}"
    expected = {
        "tofu": {"forget/prob", "forget/rouge_l_recall", "forget/truth_ratio", "model_utility"},
        "muse": {"verbmem_f", "knowmem_f", "knowmem_r", "privleak_auc"},
        "wmdp": {"bio/accuracy", "cyber/accuracy", "mmlu/accuracy"},
    }[benchmark]
    assert expected <= set(metrics), sorted(metrics)


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_config_runs_two_steps_on_tiny_model(config, tiny_model_dir, fake_hub, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    cfg = parsed_config(config, capsys)
    benchmark = eval_callback(cfg)["benchmark"]
    cli = main(["fit", *tiny_args(config, tiny_model_dir, str(tmp_path))])
    assert cli.trainer.global_step == 2

    # the configs' own hub sets were read: forget and retain for training, the eval splits
    requested = set(fake_hub)
    assert expected_requests(cfg) <= requested, requested
    assert len(requested) >= 2 + len(eval_callback(cfg)["splits"]) - 1  # (MUSE reuses privleak's fixture)

    # the benchmark's evaluation ran at the configured stages, in range, with its files written
    summary = json.loads((tmp_path / f"{benchmark}_eval.json").read_text())
    stages = [e["stage"] for e in summary["evaluations"]]
    if benchmark == "wmdp":
        assert stages == ["fit_start", "fit_end"]
    else:
        assert stages == ["fit_start", "validation"]
    for evaluation in summary["evaluations"]:
        assert_metric_ranges(benchmark, evaluation["metrics"])
    assert (tmp_path / f"{benchmark}_eval.png").stat().st_size > 5000
    with open(tmp_path / "metrics.csv") as f:
        logged = set(csv.DictReader(f).fieldnames)
    assert {f"{benchmark}/{k}" for k in summary["evaluations"][0]["metrics"]} <= logged

    # what trained: everything (NPO + NLL), or only the MLP down-projections of layers 5-7 (RMU)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trainable = re.compile(cfg["model"]["trainable_params"] or ".")
    for name, value in cli.model.model.state_dict().items():
        moved = not torch.equal(value, start[name])
        assert moved == bool(trainable.search(name)), f"{name}: moved={moved}"


def test_wmdp_config_test_stage_logs_the_benchmark(tiny_model_dir, fake_hub, tmp_path):
    config = "configs/wmdp/zephyr-7b_rmu_cyber.yaml"
    cli = main(["test", *tiny_args(config, tiny_model_dir, str(tmp_path))])
    logged = cli.trainer.callback_metrics
    for key in ("wmdp/bio/accuracy", "wmdp/cyber/accuracy", "wmdp/mmlu/accuracy"):
        assert float(logged[key]) in (0.0, 0.5, 1.0), key  # max_rows 2: two questions
    summary = json.loads((tmp_path / "wmdp_eval.json").read_text())
    assert [e["stage"] for e in summary["evaluations"]] == ["test"]


@pytest.mark.parametrize("config", WMDP)
def test_wmdp_configs_lm_eval_alternative_is_valid(config, capsys):
    """The commented lm-evaluation-harness block of each WMDP config, switched on as its comment says
    (scorer: lm_eval, the block uncommented), parses, passes the benchmark's option checks, and names
    tasks lm-eval 0.4.13 ships (a task or group file under lm_eval/tasks/)."""
    from blur_lightning.evals.callback import EvaluationCallback

    text = open(os.path.join(ROOT, config)).read()
    assert "scorer: ours" in text and "          # lm_eval:\n" in text
    lines, inside = [], False
    for line in text.replace("scorer: ours", "scorer: lm_eval").splitlines():
        inside = inside or line == "          # lm_eval:"
        if inside and line.startswith("          # "):
            line = "          " + line[len("          # ") :]
        elif inside:
            inside = False
        lines.append(line)
    init_args = eval_callback(yaml.safe_load("\n".join(lines)))
    callback = EvaluationCallback(**init_args)  # the option checks run here
    tasks = callback.options["lm_eval"]["tasks"]
    assert tasks == {"bio": "wmdp_bio", "cyber": "wmdp_cyber", "mmlu": "mmlu"}
    assert callback.options["lm_eval"]["num_fewshot"] == 0
    lm_eval = pytest.importorskip("lm_eval")
    shipped = set()
    for folder in ("wmdp", "mmlu/default"):
        for path in glob.glob(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", folder, "*yaml*")):
            found = yaml.safe_load(open(path).read())
            shipped.update(v for k in ("task", "group") if isinstance(v := found.get(k), str))
    assert set(tasks.values()) <= shipped, sorted(shipped)[:5]


# ============================================================================ PDU (open-unlearning's settings)
PDU_TOFU = "configs/tofu/llama3.2-1b_forget10_pdu.yaml"


def test_pdu_tofu_settings(capsys):
    """open-unlearning community/methods/PDU/run.sh for TOFU: gamma 1, pref (alpha) 100, dual step 5,
    retain eps 0.3, warm-up 5 epochs (here in optimizer steps on one device), lr 1e-5, 10 epochs; the
    entropic forget loss with its mean over answer tokens; the rest as the NPO config."""
    cfg = parsed_config(PDU_TOFU, capsys)
    model, data, trainer = cfg["model"], cfg["data"], cfg["trainer"]
    assert (model["mode"], model["forget_loss"], model["retain_loss"]) == ("pdu", "pdu_entropic", "nll")
    assert (model["gamma"], model["alpha"], model["pdu_dual_step_size"], model["pdu_retain_eps"]) == (1.0, 100.0, 5.0,
                                                                                                       0.3)  # fmt: skip
    assert model["token_reduction"] == "token"
    assert (model["optimizer"]["init_args"]["lr"], trainer["max_epochs"], trainer["devices"]) == (1e-5, 10, 1)
    steps_per_epoch = math.ceil(TOFU_FORGET_ROWS["10"] / (data["batch_size"] * model["accumulate_grad_batches"]))
    assert model["pdu_dual_warmup_steps"] == 5 * steps_per_epoch == 65
    npo = parsed_config("configs/tofu/llama3.2-1b_forget10_npo.yaml", capsys)
    for section, keys in (("data", set(data)), ("model", {"optimizer", "scheduler", "model", "model_dtype"})):
        assert {k: cfg[section][k] for k in keys} == {k: npo[section][k] for k in keys}, section


def test_pdu_tofu_config_runs_two_steps_on_tiny_model(tiny_model_dir, fake_hub, tmp_path):
    """Through the CLI with the config's hub sets: finite losses, lambda logged, and with the warm-up cut to
    one step, step 2 moves it by the rule: max(0, 100 + 5 (L_retain - 0.3))."""
    cli = main(["fit", *tiny_args(PDU_TOFU, tiny_model_dir, str(tmp_path)), "--model.pdu_dual_warmup_steps", "1"])
    assert cli.trainer.global_step == 2
    keys = ("train/pdu_lambda", "train/forget_loss", "train/retain_loss")
    with open(tmp_path / "metrics.csv") as f:  # a step's values may be written on two rows
        rows = list(dict.fromkeys(tuple(float(r[k]) for k in keys) for r in csv.DictReader(f) if r[keys[0]]))
    assert len(rows) == 2 and all(math.isfinite(v) for row in rows for v in row)
    assert rows[0][0] == rows[1][0] == 100.0  # the warm-up step leaves it
    assert float(cli.model.pdu_lambda) == pytest.approx(max(0.0, 100.0 + 5.0 * (rows[1][2] - 0.3)), rel=1e-6)
