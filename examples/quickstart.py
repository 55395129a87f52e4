"""Which training digits pushed five test predictions up? (the README quickstart)"""

import sourcekit
from sourcekit import UnrolledAttributor

task = sourcekit.datasets.load_digits_task()  # 8x8 digits: 1437 training, 360 test images
trajectory = task.record("early")  # train a small MLP for 184 SGD steps, recording the run
scores = UnrolledAttributor().fit(trajectory).transform(task.test[:5])  # shape (5, 1437)

labels = task.train.targets.numpy()
for q, row in enumerate(scores):
    top = row.argsort()[::-1][:5]  # largest first: the strongest proponents
    print(f"test digit {q} (label {task.test.targets[q]}): proponents {top} labels {labels[top]}")
