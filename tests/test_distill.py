"""Distillation: the soft loss, the distilling train step, the teacher's folders and its check."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_fixtures import tiny_crossval_config
from test_train import SIZE, _batch, _data_config, _model, _setup

from mnres import config as config_lib
from mnres.data.augment import preprocess
from mnres.inference import Classifier, classify
from mnres.training import crossval, distill, steps


def _teacher(members, weight=1.0, temperature=1.0):
    return distill.Teacher(
        tuple(members), tuple(f"t{i}" for i in range(len(members))), weight, temperature
    )


def _member(size, seed):
    model = _model()
    variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)), train=False)
    return Classifier(model, dict(variables), size)


def test_soft_loss_is_t2_times_the_kl_divergence_and_zero_at_the_teacher():
    student = np.array([[2.0, -1.0], [0.3, 0.1], [-4.0, 3.0]], np.float32)
    teacher = np.array([[1.0, 0.0], [-2.0, 2.0], [0.0, 0.5]], np.float32)
    for t in (1.0, 2.0, 4.0):

        def softmax(x, t=t):
            e = np.exp(x / t - np.max(x / t, -1, keepdims=True))
            return e / e.sum(-1, keepdims=True)

        p, q = softmax(student), softmax(teacher)
        want = t * t * np.sum(q * (np.log(q) - np.log(p)), -1)
        got = distill.soft_loss(student, teacher, t)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert np.all(np.asarray(got) > 0)
        np.testing.assert_allclose(distill.soft_loss(teacher, teacher, t), 0.0, atol=1e-6)


def test_several_teachers_teach_with_the_mean_of_their_logits_each_at_its_own_size():
    small, large = _member(SIZE, 1), _member(SIZE + 16, 2)
    teacher = _teacher([small, large])
    images = preprocess(_batch()["image"])
    got = teacher.logits(teacher.variables, images)
    resized = jax.image.resize(images, (len(images), SIZE + 16, SIZE + 16, 3), "linear")
    want = (
        classify(small.model, small.variables, images)
        + classify(large.model, large.variables, resized)
    ) / 2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("teacher_size", [SIZE, SIZE + 16])
def test_the_distilling_step_trains_on_its_weighted_loss(teacher_size):
    """The step's loss is (1 - w) * the labels' cross-entropy + w * the soft loss against the
    teacher on the same (here unaugmented) views, computed here outside the step."""
    model = _model()
    state, tx, _, mesh = _setup(model)
    unaugmented = _data_config()
    unaugmented.update(flip=False, rot90=False, brightness=0, contrast=0, saturation=0, hue=0)
    batch = _batch()
    images = preprocess(batch["image"])
    member = _member(teacher_size, 3)
    logits, _ = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(0)},  # unused: the model's dropout rate is 0
    )[0]
    labels_loss = float(jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(8), batch["label"]]))
    for weight, temperature in ((0.0, 1.0), (1.0, 1.0), (0.3, 2.0)):
        teacher = _teacher([member], weight, temperature)
        soft = float(
            jnp.mean(
                distill.soft_loss(logits, teacher.logits(teacher.variables, images), temperature)
            )
        )
        train_step = steps.make_train_step(model, tx, unaugmented, mesh, teacher=teacher)
        new, metrics = train_step(jax.tree.map(jnp.copy, state), steps.shard_batch(batch, mesh))
        got = float(metrics["loss_sum"]) / len(batch["label"])
        assert got == pytest.approx((1 - weight) * labels_loss + weight * soft, rel=1e-4)
        assert int(new.step) == 1
    assert soft > 1e-3  # the teacher and the student disagree: the soft term is not idle


def test_teacher_folders_fill_the_fold_and_refuse_it_outside_cross_validation():
    assert distill.teacher_runs("runs/a", None) == ("runs/a",)
    assert distill.teacher_runs("cv/a/fold_{fold}, cv/b/fold_{fold}", 3) == (
        "cv/a/fold_3",
        "cv/b/fold_3",
    )
    with pytest.raises(config_lib.ConfigError, match="not a cross-validation fold"):
        distill.teacher_runs("cv/fold_{fold}", None)
    with pytest.raises(config_lib.ConfigError, match="empty entry"):
        distill.teacher_runs("runs/a,", None)


def test_a_folder_that_is_not_a_run_is_refused_as_a_teacher(tmp_path):
    config = config_lib.default_config().distill
    config.teacher = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match="config.distill.teacher: .* not a training"):
        distill.load(config)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("weight", 1.5, r"config.distill.weight=1.5 must be in \[0, 1\]"),
        ("weight", -0.1, r"config.distill.weight=-0.1 must be in \[0, 1\]"),
        ("temperature", 0.0, "config.distill.temperature=0.0 must be > 0"),
        ("teacher", " ", "config.distill.teacher=' ' must be a run folder"),
    ],
)
def test_validation_refuses_distillation_fields_that_cannot_work(field, value, message):
    config = config_lib.default_config()
    config.distill[field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


def _manifest(train, validation, test):
    def split(slides):
        return {"slide_ids": list(slides), "names_sha256": "-".join(slides)}

    return {"splits": {"train": split(train), "validation": split(validation), "test": split(test)}}


@pytest.mark.parametrize(
    "teacher_splits, refused",
    [
        ((["A", "B"], ["C"], ["D"]), None),  # the student's own fold
        ((["A", "B", "D"], ["C"], []), "trained on 1 slide.* test split \\(D\\)"),
        ((["A", "C"], ["B"], ["D"]), "trained on 1 slide.* validation split \\(C\\)"),
        ((["A", "B"], ["D"], ["C"]), "test split \\(D\\)"),  # D chose its checkpoint
    ],
)
def test_a_teacher_that_saw_the_students_validation_or_test_slides_is_refused(
    tmp_path, teacher_splits, refused
):
    run = tmp_path / "teacher"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps(_manifest(*teacher_splits)))
    teacher = distill.Teacher((_member(SIZE, 0),), (str(run),), 0.5, 1.0)
    student = types.SimpleNamespace(manifest=_manifest(["A", "B"], ["C"], ["D"]))
    classes = config_lib.MALARIA_CLASSES
    if refused is None:
        distill.check_unseen(teacher, student, classes)
    else:
        with pytest.raises(config_lib.ConfigError, match=refused):
            distill.check_unseen(teacher, student, classes)
    # A run without a test split (a final model) is checked on its validation slides.
    final = types.SimpleNamespace(manifest=_manifest(["A", "B", "D"], ["C"], []))
    if "validation" in (refused or ""):
        with pytest.raises(config_lib.ConfigError, match="validation split \\(C\\)"):
            distill.check_unseen(teacher, final, classes)
    with pytest.raises(config_lib.ConfigError, match="needs the student's classes"):
        distill.check_unseen(teacher, student, ("cat", "dog"))


@pytest.mark.slow
def test_each_fold_learns_from_its_own_folds_teacher(tmp_path):
    """Two folds of a teacher, then two of a student taught by 'fold_{fold}' (~90 s): each
    student fold trains, and fold 0's teacher is refused for fold 1, whose test slides it
    trained on."""
    config = tiny_crossval_config()
    teachers, students = str(tmp_path / "teachers"), str(tmp_path / "students")
    crossval.run_crossval(config, teachers, num_folds=2, compare_image_level=False)
    student = config.copy_and_resolve_references()
    student.distill.teacher = os.path.join(teachers, "fold_{fold}")
    result = crossval.run_crossval(student, students, num_folds=2, compare_image_level=False)
    assert result["patient_level"]["complete"]
    for fold in (0, 1):
        stored = json.load(open(os.path.join(students, f"fold_{fold}", "config.json")))
        assert stored["distill"]["teacher"] == student.distill.teacher  # the template
    other_fold = types.SimpleNamespace(
        manifest=json.load(open(os.path.join(students, "fold_1", "manifest.json")))
    )
    wrong = distill.load(student.distill, fold=0)
    with pytest.raises(config_lib.ConfigError, match="test split"):
        distill.check_unseen(wrong, other_fold, config_lib.MALARIA_CLASSES)
