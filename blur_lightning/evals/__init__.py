"""The evaluation wing, layered; each module imports only from the ones above it in this list.

* :mod:`~blur_lightning.evals.scoring`: where a model meets text (log-probs, continuation scores,
  greedy generation; one padding path);
* :mod:`~blur_lightning.evals.metrics`: pure metric definitions, no model;
  :mod:`~blur_lightning.evals.metric_classes`: the same as torchmetrics `Metric`s;
* :mod:`~blur_lightning.evals.reference_logs`: reading the field's evaluation logs (open-unlearning's
  ``*_EVAL.json``, TOFU's ``eval_log*.json``); :mod:`~blur_lightning.evals.log_export`: writing ours
  in open-unlearning's layout;
* :mod:`~blur_lightning.evals.base`: what a benchmark provides, :class:`EvalSettings`;
* one file per benchmark, its loader and its evaluation: :mod:`~blur_lightning.evals.qa`,
  :mod:`~blur_lightning.evals.tofu`, :mod:`~blur_lightning.evals.muse`, :mod:`~blur_lightning.evals.wmdp`;
* :mod:`~blur_lightning.evals.registry`: the benchmarks by name (adding one: one file, one entry);
* :mod:`~blur_lightning.evals.relearning`: the relearning probe and its callback;
* :mod:`~blur_lightning.evals.callback`: :class:`~blur_lightning.evals.callback.EvaluationCallback`.

Below them all: :mod:`blur_lightning.data.rows` (reading rows), :mod:`blur_lightning.data.encoding`
(tokenizing and padding), :mod:`blur_lightning.data.prompts` (the chat template).
"""
