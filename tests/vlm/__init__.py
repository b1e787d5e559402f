"""Vision-language models: LLaVA (-NeXT, -OneVision) and PaliGemma, in memory and streamed from file to file."""
