"""Evolution of the live model's architecture and optimiser settings.

This package's root loads only the genome and its operators; the engine, population,
strategies and surrogate are imported from their own modules when used.
"""

from neuralsync.evolution.genome import Block, Genome, GenomeNet, SearchSpace, inherit_weights
from neuralsync.evolution.operators import (
    MULTISCALE,
    AdaptiveSigma,
    LearningRateAnnealer,
    ResonanceRule,
    anneal,
    clip,
    crossover,
    diversity,
    multiscale_offspring,
    mutate_params,
    mutate_structure,
    random_genome,
    tournament_select,
)

__all__ = [
    "MULTISCALE",
    "AdaptiveSigma",
    "Block",
    "Genome",
    "GenomeNet",
    "LearningRateAnnealer",
    "ResonanceRule",
    "SearchSpace",
    "anneal",
    "clip",
    "crossover",
    "diversity",
    "inherit_weights",
    "multiscale_offspring",
    "mutate_params",
    "mutate_structure",
    "random_genome",
    "tournament_select",
]
