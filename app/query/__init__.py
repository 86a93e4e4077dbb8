"""REST reads (messages, replies, stats, timeline, rejected) and the dashboard."""
