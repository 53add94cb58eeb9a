"""segcli under lm-evaluation-harness: standard task suites run through the streaming memory.

`harness.SegcliLM` is an lm-eval model registered as "segcli" (importing `segcli.eval.harness` registers it;
it needs the optional extra, `pip install 'segcli[eval]'`). lm-eval 0.4 finds models only in its own registry
(no plugin entry points), so its command line is run with segcli's model registered:

    python -m segcli.eval --model segcli --model_args model=DIR,memory=fifo,memory_size=512,segment_size=128 \\
        --tasks lambada_openai
    segcli-lm-eval ...            # the same, as a console script

or from Python: `import segcli.eval.harness; lm_eval.simple_evaluate(model="segcli", model_args=...)`.
"""
