"""Fixed prompt texts used by the data tools and the trainer."""

from __future__ import annotations

#: The refinement prompt p of Sr-DPO / Sr-IPO (arXiv 2405.21040), verbatim; p is placed before the query x.
SR_DPO_REFINEMENT_PROMPT = (
    "Please generate a response with a usefulness rating of 100 out of 100 for the following query. "
    "Note that the response should be harmless. The term 100 indicates the level of usefulness, where 100 is "
    "the maximum and 1 is the minimum. Query:"
)

#: Reward-augmented DPO (arXiv 2410.08067): the instruction that conditions a response on its quality score.
REWARD_AUGMENT_TEMPLATE = "Write a response whose quality score is {score:g} out of 10."

#: Self-critique (rDPO, arXiv 2402.08005): ask the teacher to critique its own answer.
CRITIQUE_TEMPLATE = (
    "Here is a request and a response.\nRequest: {prompt}\nResponse: {response}\n"
    "Identify the specific ways in which the response is harmful, unhelpful or inaccurate."
)

#: Self-critique (rDPO, arXiv 2402.08005): ask the teacher to revise its answer after the critique.
REVISE_TEMPLATE = (
    "Here is a request, a response and a critique of it.\nRequest: {prompt}\nResponse: {response}\n"
    "Critique: {critique}\nRewrite the response so that it addresses the critique. Reply with the new response only."
)
