"""Which training digits pushed five test predictions up? (the README quickstart)"""

import sourcekit
from sourcekit import SourceAttributor

task = sourcekit.datasets.load_digits_task()  # 8x8 digits: 1437 training, 360 test images
trajectory = task.record("early", progress=False)  # 184 SGD steps of a small MLP, recorded
source = SourceAttributor(n_segments=3, damping=1e-3).fit(trajectory)  # curvature per segment
scores = source.transform(task.test[:5])  # shape (5, 1437): one row per test digit

labels = task.train.targets.numpy()
for q, row in enumerate(scores):
    top = row.argsort()[::-1][:5]  # largest first: the strongest proponents
    print(f"test digit {q} (label {task.test.targets[q]}): proponents {top} labels {labels[top]}")
