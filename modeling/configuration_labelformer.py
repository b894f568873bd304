"""Re-export of the configuration beside the modeling code (do not edit).

`save_pretrained` copies the modeling file together with the files it imports relatively, all
flat into one folder. The modeling file therefore imports its config as
`from .configuration_labelformer import LabelformerConfig`; inside our packages this stub
forwards to `configuration/configuration_labelformer.py`, and in a saved folder the real file is
written over it (the config is saved after the model code).
"""

from configuration.configuration_labelformer import *  # noqa: F401,F403
from configuration.configuration_labelformer import LabelformerConfig  # noqa: F401
