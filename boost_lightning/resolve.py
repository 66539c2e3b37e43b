"""The package's named specs, resolved where the layers meet: embedded task data and model-alias tokenizers.

The data layer reads files, dataset directories and HF names, and never imports the simulators or the model code
(see :mod:`boost_lightning.data.specs`). The strings below stand for things those layers make; this module turns
them into what the data layer reads, and registers itself with it:

=============================  ===========  =======================================================================
spec                           kind         resolves to
=============================  ===========  =======================================================================
``embedded:<task>/<split>``    data         ``<split>.jsonl`` (real, synthetic, validation, test) of the task's
                                            generated data, default settings, generated on first use
``embedded:<task>``            tokenizer    the ``tokenizer/`` directory saved with that data
``smollm2-135m-instruct``,     tokenizer    SmolLM2's ChatML tokenizer (:mod:`boost_lightning.models.pretrained`)
``smollm2``
=============================  ===========  =======================================================================

``import boost_lightning``, which runs before any of its submodules is imported, imports this module, so the specs
work everywhere: in YAML configs read by :mod:`boost_lightning.cli` and in Python alike. In Python,
:func:`boost_lightning.envs.embedded.embedded_splits` gives the same paths directly (and takes synthesizer settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from boost_lightning.data.specs import register_spec_resolver

EMBEDDED = "embedded:"


def resolve_data(spec: str) -> Path | None:
    """``embedded:<task>/<split>`` to that split's JSONL file (generated on first use); ``None`` for other specs.

    Raises:
        ValueError: an ``embedded:`` spec without a task and a split, or with a split that is not one of ``real``,
            ``synthetic``, ``validation``, ``test``.
    """
    if not spec.startswith(EMBEDDED):
        return None
    task, _, split = spec.removeprefix(EMBEDDED).partition("/")
    if not task or not split:
        raise ValueError(f"{spec!r}: expected embedded:<task>/<split>, e.g. embedded:maze/real")
    # Imported on first use: ``import boost_lightning`` runs this module and must stay cheap.
    from boost_lightning.envs.embedded import SPLITS, embedded_splits

    if split not in SPLITS:
        raise ValueError(f"{spec!r}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    return embedded_splits(task)[split]


def resolve_tokenizer(spec: str) -> Any:
    """``embedded:<task>`` to the task's tokenizer directory, a model alias to its tokenizer; ``None`` otherwise.

    Raises:
        ValueError: ``embedded:`` without a task, or with a split (a data spec given as the tokenizer).
    """
    if spec.startswith(EMBEDDED):
        task = spec.removeprefix(EMBEDDED)
        if not task or "/" in task:
            raise ValueError(f"{spec!r}: a tokenizer spec is embedded:<task>, e.g. embedded:maze")
        from boost_lightning.envs.embedded import embedded_splits

        return embedded_splits(task)["tokenizer"]
    from boost_lightning.models.pretrained import is_alias, smollm2_tokenizer

    return smollm2_tokenizer() if is_alias(spec) else None


register_spec_resolver("data", "boost_lightning", resolve_data)
register_spec_resolver("tokenizer", "boost_lightning", resolve_tokenizer)
