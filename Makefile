# Thin aliases for ./dev (which needs nothing but bash and Python 3.11 on a fresh machine).
.PHONY: demo test bench setup proto
demo test bench setup proto:
	./dev $@
