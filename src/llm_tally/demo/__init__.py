"""The demo: a fake OpenAI-compatible backend and a scripted run of users on different plans."""
