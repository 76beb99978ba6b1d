"""The trainer `postrain dpo` builds for a parsed `loss:` section: the one whose batches carry the losses' data
shape (postrain.preference.section). It sits above the three, since the list-wise and unpaired trainers subclass
the pair trainer (postrain.trainers.dpo), which names them only by path (`SHAPE_TRAINERS`) when it refuses losses
of another shape.
"""

from __future__ import annotations

from postrain.preference.section import LISTS, PAIRS, UNPAIRED, LossTerm, losses_shape
from postrain.trainers.dpo import PostrainDPOTrainer
from postrain.trainers.listwise import ListwiseDPOTrainer
from postrain.trainers.unpaired import UnpairedDPOTrainer

# Each data shape's trainer; a shape without one is a KeyError, never another shape's trainer.
TRAINER_OF_SHAPE = {PAIRS: PostrainDPOTrainer, LISTS: ListwiseDPOTrainer, UNPAIRED: UnpairedDPOTrainer}


def trainer_class_for(terms: list[LossTerm]) -> type:
    """The trainer `postrain dpo` builds for these terms: the one whose batches carry their data shape."""
    return TRAINER_OF_SHAPE[losses_shape(terms)]
