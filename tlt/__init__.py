"""tlt: a rollout engine for RL training of reasoning LLMs."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import tlt` stays cheap; torch loads when an Engine is asked for.
    if name == "Engine":
        from tlt.engine.engine import Engine

        return Engine
    if name == "SamplingParams":
        from tlt.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
