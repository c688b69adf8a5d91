"""The command line: bad input is a one-line error without a traceback; --help explains every option."""

import subprocess
import sys


def test_bad_input_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nemo_upcycle.cli", "demo", "--router", "bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("nemo-upcycle demo: error: argument --router: invalid choice")
    assert len(proc.stderr.splitlines()) == 1 and "`nemo-upcycle demo --help` lists the options" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "nemo_upcycle.cli", "convert", "in.nemo", "out.nemo", "--bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == (
        "nemo-upcycle convert: error: unrecognized arguments: --bogus (`nemo-upcycle convert --help` lists the options)\n")
    proc = subprocess.run([sys.executable, "-m", "nemo_upcycle.cli", "demo", "--dense", str(tmp_path / "x.nemo"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --dense {tmp_path / 'x.nemo'} does not exist: pass an existing dense checkpoint")


def test_every_command_documents_every_option():
    import argparse

    from nemo_upcycle.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest != "help" and action.help != argparse.SUPPRESS:
                assert action.help and len(action.help) > 10, f"{name} {action.dest}"


def test_library_errors_name_config_fields_and_the_cli_says_the_flags():
    from nemo_upcycle.cli import as_flags

    assert as_flags("output_format=hf needs hf_arch: one of mixtral, qwen2_moe") == \
        "--format hf needs --hf-arch: one of mixtral, qwen2_moe"
    assert as_flags("target_engine=vllm hf_arch=mixtral: x; use hf_arch=qwen2_moe or qwen3_moe") == \
        "--target-engine vllm --hf-arch mixtral: x; use --hf-arch qwen2_moe or qwen3_moe"
    assert as_flags("does model_config match model_config.yaml? my_hf_arch_x") == \
        "does model_config match model_config.yaml? my_hf_arch_x"
    assert as_flags("no MMLU files in x: pass data_dir=the cais/mmlu folder; or use MMLU with data_dir") == \
        "no MMLU files in x: pass --data-dir the cais/mmlu folder; or use MMLU with --data-dir"
    assert as_flags("num_fewshot 3 must be >= 0: pass num_fewshot=0, tasks=mmlu, model_config=C.yaml") == \
        "num_fewshot 3 must be >= 0: pass --num-fewshot 0, --tasks mmlu, --model-config C.yaml"


def test_train_override_typos_are_one_line_errors(capsys):
    from nemo_upcycle.cli import main

    for args, message in ((["foo=1"], "error: Could not override 'foo'. To append to your config use +foo=1: fix"),
                          (["model=nope"], "error: In 'train': Could not find 'model/nope' Available options in "
                                           "'model': demo_dense, nemotron4_15b, plateau_dense, tiny_cpu: fix"),
                          (["--config-name", "nope"], "error: Cannot find primary config 'nope'.")):
        assert main(["train", "--print-config", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err


def test_expansion_and_num_experts_must_agree(capsys):
    from nemo_upcycle.cli import main

    assert main(["convert", "in.nemo", "out.nemo", "--dry-run", "--expansion", "4", "--num-experts", "64",
                 "--granularity", "8"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --expansion 4 and --num-experts 64 disagree (E = experts / G = 8 at granularity 8): give one of the two")


def test_convert_options_that_would_be_ignored_or_refused_later_are_refused_first(tmp_path, capsys):
    from nemo_upcycle.cli import main

    existing = tmp_path / "out.nemo"
    existing.write_text("precious")
    for args, message in (
            (["--dry-run", "--layers", ""], "error: --layers must be comma-separated 0-based layer indices"),
            (["--max-shard-size", "2GB"], "error: --max-shard-size applies to --format hf only, not nemo: drop it"),
            (["--hf-arch", "mixtral"], "error: --hf-arch mixtral applies to --format hf only, not nemo: drop it"),
            (["--recipe", "E4G4T2", "--router-init", "calibrated"],
             "error: top-k 2 must be a multiple of granularity 4 for virtual-group routing: pick topk in multiples "
             "of G, or --router-init random")):
        assert main(["convert", str(tmp_path / "in.nemo"), str(tmp_path / "o.nemo"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message), err
    assert main(["convert", str(tmp_path / "in.nemo"), str(existing), "--dry-run"]) == 2  # as a real run would
    assert capsys.readouterr().err.strip() == f"error: {existing} already exists: choose another output path or pass --overwrite"


def test_train_numbers_and_inputs_that_would_fail_deep_inside_are_refused_first(capsys, tmp_path):
    from nemo_upcycle.cli import main

    for override, message in (("micro_batch_size=0", "micro_batch_size must be a positive integer, got 0"),
                              ("optim.lr=-1e-4", "optim.lr must be a positive number, got -0.0001"),
                              ("expert_lr_mult=-1", "expert_lr_mult must be a positive number, got -1"),
                              ("optim.lr=1e-7", "optim.lr 1e-07 is below optim.sched.min_lr"),
                              ("restore_from=/no/such.nemo", "restore_from=/no/such.nemo does not exist"),
                              ("trainer.max_steps=1", "data.data_prefix is not set: pass data.data_prefix=[PREFIX]"),
                              ("data.data_prefix=[/no/such]", "dataset prefix /no/such: /no/such.bin and")):
        assert main(["train", override, f"exp_manager.exp_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []  # refused before exp_manager made a run folder
