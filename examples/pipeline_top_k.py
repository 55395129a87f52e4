"""An attributor in a scikit-learn Pipeline: the top proponents and opponents of each query.

Attributors are scikit-learn transformers whose samples are the queries: ``fit`` reads the
recorded run from a bound task, ``transform`` turns queries into a score matrix of shape
(n_queries, n_train). ``TopKProponents`` follows it and keeps, per query, the indices of
the k training examples with the largest scores (proponents: including them raised the
query's margin) and the k with the smallest (opponents: they lowered it).

The script shows

- the pipeline ``SourceAttributor -> TopKProponents`` on a bound task, and the scores of
  the examples it selected (``TopKProponents.select``);
- the score matrix as a pandas DataFrame with ``set_output(transform="pandas")``, columns
  ``train0 .. train1436`` (skipped if pandas is not installed);
- a grid search over ``attr__damping``, the damping of the pipeline's attributor, scored
  against a small retraining ground truth.

Run it with ``python examples/pipeline_top_k.py``.
"""

import time

from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

import sourcekit
from sourcekit import LDSScorer, SourceAttributor, TopKProponents
from sourcekit.evaluation import make_subset_masks, retrain_measurements

try:
    import pandas
except ImportError:  # pandas is optional; only the DataFrame part needs it
    pandas = None

started = time.perf_counter()
task = sourcekit.datasets.load_digits_task()
trajectory = task.record("early", progress=False)
labels = task.train.targets.numpy()  # labels of the training digits, to read the results
X = trajectory.bind(task.test[:40])  # 40 test digits bound to the run: scikit-learn's X

# --- the pipeline -----------------------------------------------------------------------------
pipe = Pipeline([("attr", SourceAttributor()), ("top", TopKProponents(k=5))])
pipe.fit(X)  # fits the attributor (curvature) and TopKProponents on X's scores
top = pipe.transform(X[:3])  # (3, 10): 5 proponents, then 5 opponents, per query
print(f"pipe.transform(X[:3]) has shape {top.shape}: 5 proponents, then 5 opponents\n")

# select() returns the indices with their scores; feed it the attributor's scores.
selected = pipe["top"].select(pipe["attr"].transform(X[:3]))
for q in range(3):
    print(f"test digit {q} (label {int(task.test.targets[q])})")
    for kind, part in (("proponents", slice(0, 5)), ("opponents ", slice(5, 10))):
        found = ", ".join(
            f"#{m} ({labels[m]}) {s:+.3f}"
            for m, s in zip(selected.indices[q, part], selected.scores[q, part], strict=True)
        )
        print(f"  {kind}: {found}")

# Over all 40 queries: how often do the proponents share the query's label?
top = pipe.transform(X)
query_labels = task.test.targets[:40].numpy()[:, None]
same_proponents = (labels[top[:, :5]] == query_labels).mean()
same_opponents = (labels[top[:, 5:]] == query_labels).mean()
print(
    f"\nOver all {len(X)} test digits, {same_proponents:.0%} of the top-5 proponents share the\n"
    f"query's label and {same_opponents:.0%} of the top-5 opponents do: opponents are digits\n"
    "of another class that looks similar, and including them pulled the margin down."
)

# --- the scores as a DataFrame ----------------------------------------------------------------
if pandas is None:
    print("\npandas is not installed: skipping set_output(transform='pandas').")
else:
    frame = SourceAttributor().set_output(transform="pandas").fit(X).transform(X[:3])
    print(f"\nAs a DataFrame: shape {frame.shape}, columns {list(frame.columns[:3])} ...")
    print("the five largest scores of test digit 0, by column name:")
    print(frame.loc[0].nlargest(5).round(3).to_string())

# --- a search over the pipeline's damping -----------------------------------------------------
# A search needs a score that says which damping is better. Here: the linear datamodeling
# score against the recipe retrained on 20 random halves of the training set (see
# examples/choose_damping.py). LDSScorer needs the score matrix, so it is applied to the
# pipeline without its last step, pipe[:-1], which ends with the attributor.
masks = make_subset_masks(trajectory.n_train, n_subsets=20, random_state=0)
y = retrain_measurements(trajectory, X.queries, masks, seeds=0, progress=False).outputs
lds = LDSScorer(masks)


def lds_of_scores(pipeline, X, y):
    return lds(pipeline[:-1], X, y)


search = GridSearchCV(pipe, {"attr__damping": [1e-4, 1e-2, 1.0]}, scoring=lds_of_scores, cv=4).fit(
    X, y
)
print("\nGrid search over attr__damping (LDS, mean over 4 folds of queries):")
for damping, score in zip(
    search.cv_results_["param_attr__damping"],
    search.cv_results_["mean_test_score"],
    strict=True,
):
    print(f"  attr__damping={damping:<7g} LDS {score:.3f}")
print(f"best: {search.best_params_}; search.best_estimator_ is the refitted pipeline")
print(f"\nDone in {time.perf_counter() - started:.1f} s.")
