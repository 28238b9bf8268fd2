"""The chat page `dialogtune serve` shows at `/` (plain HTML and JavaScript, no build step)."""
