"""Run every evaluation (QA, TOFU, MUSE, WMDP, the relearning probe) inside a fit, in one process or
under DDP / FSDP2, and save what each rank computed.

Usage (one process per rank; tests/evals/test_multiprocess.py's launcher sets LOCAL_RANK etc.):

    python tests/dist_workers/eval_worker.py SPEC.json

SPEC is {"out": DIR, "fixtures": DIR, "cases": [{"name", "layout": "single" | "ddp" | "fsdp2"}]};
each case writes DIR/<name>.rank<R>.json with {benchmark: evaluations} and the probe's results.
The fit trains with SGD at lr 0 (the weights never move), so every layout evaluates the same
weights and the numbers must be one process's.
"""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from blur_worker import make_strategy  # noqa: E402

TOFU_FILES = {
    "forget": "tofu/forget01_perturbed.json",
    "retain": "tofu/retain_perturbed.json",
    "real_authors": "tofu/real_authors_perturbed.json",
    "world_facts": "tofu/world_facts_perturbed.jsonl",
}
MUSE_FILES = {
    "verbmem": "muse/verbmem_forget.json",
    "knowmem_forget": "muse/knowmem_forget_qa.json",
    "privleak_forget": "muse/raw_forget.jsonl",
    "privleak_holdout": "muse/privleak_holdout.json",
}
WMDP_FILES = {"bio": "wmdp/wmdp-bio.json"}


# With these stop ids the seed-0 tiny model's greedy answers to the 17 forget questions all stop
# after one token but the last (measured): in batches of 4 that is batch 4 ([16]) decoding 8 steps on
# rank 0 while rank 1's dummy batch stops after 1; FSDP2 deadlocks unless generate is synced.
UNEVEN_STOP_IDS = [197, 338]


class UnevenStops(pl.Callback):
    """At train start, greedy answers whose stopping differs between the ranks' batches; at every
    validation end, the value a ModelCheckpoint monitoring "qa/forget/answer_prob" would read."""

    def __init__(self, tokenizer, forget_path: str) -> None:
        from blur_lightning.data.encoding import encode_prompts
        from blur_lightning.data.rows import load_rows

        self.tokenizer = tokenizer
        questions = [r["question"] for r in load_rows(forget_path)]
        self.prompt_ids = encode_prompts(tokenizer, questions, prompt_format="auto")
        self.texts: list[str] = []
        self.monitored: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        from blur_lightning.evals.scoring import greedy_continuations

        self.texts = greedy_continuations(pl_module.model, self.tokenizer, self.prompt_ids, 8, 4,
                                          stop_ids=UNEVEN_STOP_IDS, show_progress=False)  # fmt: skip

    def on_validation_end(self, trainer, pl_module) -> None:
        self.monitored.append(float(trainer.callback_metrics["qa/forget/answer_prob"]))


def run_case(case: dict, fixtures: str, out: str) -> dict:
    from blur_lightning.data.datamodule import ForgetRetainDataModule
    from blur_lightning.evals.callback import EvaluationCallback
    from blur_lightning.evals.relearning import RelearningProbe
    from blur_lightning.testing.tiny import tiny_llama, tiny_tokenizer
    from blur_lightning.training.unlearner import BLURUnlearner

    def paths(files: dict[str, str]) -> dict[str, str]:
        return {name: os.path.join(fixtures, path) for name, path in files.items()}

    from blur_lightning.evals import scoring

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), seed=0)
    # rows this rank scored and generated for (dummy batches included): each rank's share, not all
    work = {"scored": 0, "generated": 0}
    # on the class: an instance attribute would be deep-copied into the probe's copy still bound to `model`
    # scoring._token_scores: the one forward every score_rows / top-2 readout batch goes through
    score, generate, model_class = scoring._token_scores, type(model).generate, type(model)

    def counted_score(m, input_ids, *args, **kwargs):
        work["scored"] += input_ids.shape[0]
        return score(m, input_ids, *args, **kwargs)

    def counted_generate(self, *args, input_ids, **kwargs):
        work["generated"] += input_ids.shape[0]
        return generate(self, *args, input_ids=input_ids, **kwargs)

    scoring._token_scores, model_class.generate = counted_score, counted_generate
    module = BLURUnlearner(model, forget_loss="ga", export_dir=None, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    module.tokenizer = tokenizer
    forget = os.path.join(fixtures, "qa", "forget.jsonl")
    data = ForgetRetainDataModule(forget_path=forget, retain_path=os.path.join(fixtures, "qa", "retain.jsonl"),
                                  tokenizer="unused", batch_size=4, max_length=48)  # fmt: skip
    data.set_tokenizer(tokenizer)
    # batch sizes that leave the ranks uneven: 17 QA rows in batches of 3 are 6 batches, 3 + 3;
    # in batches of 4, 5 batches: rank 0 runs 3, rank 1 runs 2 and (FSDP2) one dummy
    qa = EvaluationCallback("qa", {"forget": forget}, stages=["fit_start", "validation"], max_new_tokens=4,
                            batch_size=4)  # fmt: skip
    tofu = EvaluationCallback("tofu", paths(TOFU_FILES), stages=["fit_start"], max_new_tokens=4, batch_size=3)
    muse = EvaluationCallback("muse", paths(MUSE_FILES), stages=["fit_start"], max_new_tokens=5, batch_size=2,
                              options={"auc_retrain": 0.5})  # fmt: skip
    wmdp = EvaluationCallback("wmdp", paths(WMDP_FILES), stages=["fit_start"], batch_size=3)
    probe = RelearningProbe(forget, steps=3, lr=1e-2, batch_size=4, train_column="answer", max_length=48,
                            max_new_tokens=3, eval_batch_size=4)  # fmt: skip
    uneven = UnevenStops(tokenizer, forget)
    single = case["layout"] == "single"
    trainer = pl.Trainer(
        accelerator="cpu", devices=1 if single else 2, strategy=make_strategy({**case, "accelerator": "cpu",
        "bucket_view": False, "param_dtype": None, "reduce_dtype": None}),
        max_steps=1, val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
        default_root_dir=os.path.join(out, case["name"]),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[uneven, qa, tofu, muse, wmdp, probe],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return {
        "evaluations": {cb.benchmark: cb.evaluations for cb in (qa, tofu, muse, wmdp)},
        "probe": probe.results,
        "work": work,
        "uneven_stops": uneven.texts,
        "monitored": uneven.monitored,
    }


def main() -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two cores shared by both ranks (and other jobs)
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    env = os.environ
    rank = int(env.get("NODE_RANK", 0)) * int(env.get("LOCAL_WORLD_SIZE", 1)) + int(env.get("LOCAL_RANK", 0))
    for case in spec["cases"]:
        result = run_case(case, spec["fixtures"], spec["out"])
        for evaluations in result["evaluations"].values():
            for e in evaluations:
                e.pop("seconds")  # wall time: the one field that differs between runs
        with open(os.path.join(spec["out"], f"{case['name']}.rank{rank}.json"), "w") as f:
            json.dump(result, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
