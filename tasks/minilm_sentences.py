"""The sentence set of the ``minilm_fidelity`` probe: 16 topics, two paraphrases each (written for attnbench).

Sentence ``2 i`` and ``2 i + 1`` say the same thing in other words; the exact model finds each one's paraphrase as
its nearest neighbour for most pairs, which is what a swapped attention must keep.
"""
SENTENCES = (
    "A man is playing a guitar on the stage.",
    "On stage, a musician plays his guitar.",
    "The cat is sleeping on the warm windowsill.",
    "A kitten naps in the sun by the window.",
    "Heavy rain flooded the streets of the city last night.",
    "Yesterday evening a downpour left the town's roads under water.",
    "She bought fresh vegetables at the farmers market.",
    "At the local market she picked up some fresh produce.",
    "The stock market fell sharply after the announcement.",
    "Share prices dropped steeply once the news was released.",
    "Children are building a sandcastle on the beach.",
    "Kids make a castle out of sand by the sea.",
    "The train to London was delayed by two hours.",
    "Our London-bound train arrived two hours late.",
    "He fixed the leaking pipe under the kitchen sink.",
    "The plumber repaired a leak beneath the sink.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Researchers found a previously unknown frog in the jungle.",
    "The football team won the championship final.",
    "Our soccer club took the title in the cup final.",
    "Please remember to turn off the lights when you leave.",
    "Don't forget to switch the lamps off on your way out.",
    "The recipe calls for two cups of flour and an egg.",
    "You need an egg and two cups of flour for this dish.",
    "A rocket was launched into orbit this morning.",
    "Early today a spacecraft lifted off toward orbit.",
    "The library is closed on Sundays.",
    "On Sunday the library does not open.",
    "My laptop battery drains very quickly.",
    "The battery of my notebook computer runs out fast.",
    "A dog is chasing a ball across the park.",
    "In the park a puppy runs after a ball.",
)
