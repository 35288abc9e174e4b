"""The same run from Python: ``python run.py [key=value ...]`` in this directory."""

import sys

import dpeft

result = dpeft.simulate("config.yaml", sys.argv[1:])
print("server step per round:", [round(x, 3) for x in result.metric("server_step_lr")])
print("accuracy per round:", [round(x, 3) for x in result.metric("eval_accuracy")])
print("adapter:", result.export_path)
