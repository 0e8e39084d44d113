"""The served model's code, as MLflow's "models from code" wants it: MLflow runs this file when it
loads the model, so the logged model holds no pickled object (the bundle holds only data)."""

from convcg_cli import tracking
from convcg_cli.serve.pyfunc import CandidateGenerator

tracking.set_served_model(CandidateGenerator())
