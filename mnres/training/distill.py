"""Knowledge distillation: the student also learns a trained teacher's outputs on its own views.

`config.distill.teacher` names the teacher's run folder(s); several teach with the mean of
their logits, as an `mnres.models.Ensemble` of them would. The teacher sees each augmented (and
mixed) batch exactly as the student does, inside the same jitted step, in inference mode: a
consistent teacher (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and
consistent"). A teacher of another input size sees the batch resized to its own. The loss is

    (1 - weight) * cross-entropy(labels) + weight * T^2 * KL(softmax(t / T) || softmax(s / T))

(Hinton et al. 2015; T^2 keeps the soft term's gradients the same size whatever T).

In cross-validation `{fold}` in the teacher's folder is the fold's number, so that fold k's
student learns from a teacher trained on fold k's training slides. `check_unseen` refuses a
teacher that trained on a slide of the student's validation or test split: what it learnt of
them would reach the student and inflate both figures.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from absl import logging

from mnres import run_folder
from mnres.config.schema import ConfigError
from mnres.inference import Classifier, classify

FOLD_FIELD = "{fold}"


@dataclasses.dataclass(frozen=True)
class Teacher:
    """Trained classifiers whose mean logits teach (`runs`: their folders), and how: the soft
    loss's share of the loss (`weight`) and its `temperature` (`config.distill`)."""

    members: tuple[Classifier, ...]
    runs: tuple[str, ...]
    weight: float
    temperature: float

    @property
    def variables(self) -> tuple[dict, ...]:
        """The members' variables: the train step takes them as an argument (a constant would
        be copied into the compiled program)."""
        return tuple(m.variables for m in self.members)

    def logits(self, variables, images) -> jnp.ndarray:
        """float32 [B, K]: the mean of the members' logits on `images` (preprocessed, any size)."""
        outs = []
        for member, member_vars in zip(self.members, variables, strict=True):
            size = member.image_size
            if images.shape[1:3] != (size, size):
                images_in = jax.image.resize(images, (images.shape[0], size, size, 3), "linear")
            else:
                images_in = images
            outs.append(classify(member.model, member_vars, images_in).astype(jnp.float32))
        return jax.lax.stop_gradient(jnp.mean(jnp.stack(outs), axis=0))


def teacher_runs(spec: str, fold: int | None) -> tuple[str, ...]:
    """The run folders `config.distill.teacher` names, `{fold}` filled in.

    Raises:
      ConfigError: `{fold}` outside cross-validation, or an empty entry.
    """
    runs = tuple(part.strip() for part in spec.split(","))
    if any(not r for r in runs):
        raise ConfigError(
            f"config.distill.teacher={spec!r} has an empty entry: give run folders joined by ','."
        )
    if FOLD_FIELD in spec:
        if fold is None:
            raise ConfigError(
                f"config.distill.teacher={spec!r} names a fold ('{{fold}}'), but this run is not "
                "a cross-validation fold: give the teacher's run folder itself."
            )
        runs = tuple(r.replace(FOLD_FIELD, str(fold)) for r in runs)
    return runs


def load(distill_config, fold: int | None = None) -> Teacher:
    """The teacher `distill_config` (`config.distill`) names, for cross-validation fold `fold`.

    Raises:
      ConfigError: a folder that is not a finished training run (checkpoint and config).
    """
    runs = teacher_runs(distill_config.teacher, fold)
    members = []
    for run in runs:
        try:
            members.append(run_folder.load_run(run))
        except ValueError as e:
            raise ConfigError(f"config.distill.teacher: {e}") from None
    classes = {m.class_names for m in members}
    if len(classes) != 1:
        raise ConfigError(
            f"config.distill.teacher: the runs {', '.join(runs)} have different classes "
            f"({' / '.join(map(str, sorted(classes)))}); every teacher needs the student's."
        )
    for run, m in zip(runs, members, strict=True):
        logging.info(
            "Distilling from %s (%s checkpoint, step %s, %d px)",
            run, m.metadata["checkpoint"], m.metadata["step"], m.image_size,
        )  # fmt: skip
    return Teacher(
        tuple(members), runs, float(distill_config.weight), float(distill_config.temperature)
    )


def check_unseen(teacher: Teacher, ds, class_names: tuple[str, ...]) -> None:
    """Refuses a teacher that trained on this run's validation or test data, or on other classes.

    With slide ids on both sides (folder sources split by slide), no slide of the teacher's
    training split may be in the student's validation or test split, and none of its validation
    slides (which chose its checkpoint) in the student's test split. Without them the check
    can only be made by the splits' name hashes: equal hashes are the same split, else a
    warning says it could not be checked.

    Raises:
      ConfigError: naming the teacher, the split and up to three slides.
    """
    if teacher.members[0].class_names != tuple(class_names):
        raise ConfigError(
            f"config.distill.teacher {teacher.runs[0]} classifies {teacher.members[0].class_names}"
            f", this run's data {tuple(class_names)}: a teacher needs the student's classes."
        )
    mine = ds.manifest["splits"]
    for run in teacher.runs:
        if not os.path.isfile(os.path.join(run, run_folder.MANIFEST_JSON)):
            logging.warning(
                "Distillation: %s has no %s: it cannot be checked that the teacher never "
                "trained on this run's validation or test images.",
                run, run_folder.MANIFEST_JSON,
            )  # fmt: skip
            continue
        theirs = run_folder.read_manifest(run)["splits"]
        # A split may be empty (a final run keeps no test split): any slide ids will do.
        if any(map(_slides, mine.values())) and any(map(_slides, theirs.values())):
            for split, seen_by in (("validation", ("train",)), ("test", ("train", "validation"))):
                seen = set().union(*(_slides(theirs[s]) for s in seen_by))
                both = sorted(_slides(mine[split]) & seen)
                if both:
                    raise ConfigError(
                        f"config.distill.teacher {run} trained on {len(both)} slide(s) of this "
                        f"run's {split} split ({', '.join(both[:3])}): its outputs would carry "
                        "them to the student. Give a teacher trained on this run's training "
                        "slides only (in cross-validation: the same fold's run, '{fold}')."
                    )
        elif any(
            mine[s].get("names_sha256") != theirs[s].get("names_sha256")
            for s in ("validation", "test")
        ):
            logging.warning(
                "Distillation: %s and this run have no slide ids to compare and other "
                "validation/test splits: it cannot be checked that the teacher never trained "
                "on this run's validation or test images.",
                run,
            )


def _slides(split_manifest: dict) -> set[str]:
    return {str(s) for s in split_manifest.get("slide_ids") or () if s}


def soft_loss(student_logits, teacher_logits, temperature: float) -> jnp.ndarray:
    """[B]: T^2 KL(softmax(teacher / T) || softmax(student / T)), in float32."""
    t = jnp.asarray(temperature, jnp.float32)
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
    log_q = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t)
    return t * t * jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
