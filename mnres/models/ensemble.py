"""Several trained models of the same crops, as one model: the mean of their logits.

With two classes the mean of the members' logits has the mean of their log-odds as its
log-odds (logit 1 - logit 0 is linear), which is what the per-fold ensembles of the recipe
search score (`experiments.search.ensemble_folds`). An `Ensemble` is a Flax module like the
others, so a run folder, `load_pretrained`, `predict` and the exports take it as they take one
network; its variables hold each member's under `members_0`, `members_1`, ...
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import linen as nn


class Ensemble(nn.Module):
    """`(mean logits, {'members': [each member's intermediates]})` of its member models."""

    members: Sequence[nn.Module]

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    @property
    def frozen_layers(self) -> tuple[str, ...]:
        return ()  # an ensemble is combined from trained members, not trained as one

    def clone_members(self, **overrides) -> Ensemble:
        """The ensemble with `overrides` set on every member (e.g. the export's conv
        formulation and dtype)."""
        return self.clone(members=tuple(m.clone(**overrides) for m in self.members))

    @nn.compact
    def __call__(self, x, train: bool = False):
        if train:
            raise ValueError("an Ensemble is combined from trained runs, not trained as one")
        outputs = [member(x, train=False) for member in self.members]
        logits = jnp.mean(jnp.stack([logits for logits, _ in outputs]), axis=0)
        return logits, {"members": [out for _, out in outputs], "logits": logits}


def member_variables(variables: dict, index: int) -> dict:
    """Member `index`'s {'params', 'batch_stats'} out of an ensemble's variables."""
    return {kind: tree[f"members_{index}"] for kind, tree in variables.items()}


def combine_variables(members: Sequence[dict]) -> dict:
    """An ensemble's variables from its members' {'params', 'batch_stats'}, in order."""
    kinds = {kind for variables in members for kind in variables if variables[kind]}
    return {
        kind: {f"members_{i}": variables[kind] for i, variables in enumerate(members)}
        for kind in sorted(kinds)
    }
