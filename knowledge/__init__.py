"""UniKE's knowledge side: mined (question, true answer, hallucinated answer) triplets and their hidden states.

`python -m knowledge.mine --config configs/knowledge/world_llava.yaml` mines the triplets and extracts
their states into a knowledge folder; editors read them back with `load_knowledge_states` and compute
states of new probes with `extract_states`. Only the light parts are imported here (no world, no data
loaders), so editors can import this package without pulling in the mining sources.
"""

from knowledge.states import KnowledgeStates, extract_states, load_knowledge_states
from knowledge.store import KnowledgeStoreError, backbone_key

__all__ = [
    "KnowledgeStates",
    "KnowledgeStoreError",
    "backbone_key",
    "extract_states",
    "load_knowledge_states",
]
