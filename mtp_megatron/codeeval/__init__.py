"""Code evaluation: HumanEval and MBPP problems (tasks.py), completions from the decoder (generation.py), sandboxed
execution of each completion with the task's tests (execution.py) and pass@k (passk.py); the entry point is
mtp_megatron/evaluate_code.py."""
