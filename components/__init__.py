"""Kubeflow Pipelines components: one per pipeline step, each a thin typed wrapper over :mod:`unet3plus`.

Every component runs in the project's image (:data:`components.common.IMAGE`), takes the text of
``params.yaml`` (plus, for training and evaluation, an ablation's name), checks its inputs and
calls the library.
"""

from components.ablations import ablation_names
from components.common import IMAGE
from components.data_params import data_params
from components.evaluate import evaluate_model
from components.preprocess import preprocess_data
from components.raw_data import raw_data
from components.register import register_model
from components.report import report_ablations
from components.train import train_model
from components.validate import validate_data

__all__ = ["IMAGE", "ablation_names", "data_params", "evaluate_model", "preprocess_data", "raw_data", "register_model",
           "report_ablations", "train_model", "validate_data"]
