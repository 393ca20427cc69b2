"""Train seeded GPT-2 members and measure what their ensemble gains over each of them."""

__version__ = "0.1.0"
