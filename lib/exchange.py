"""How workers keep their weights in step. The training loop talks to one of these and never
asks how many workers there are.

    after_step(step)     called after every optimiser step (the 2-worker exchanger swaps and
                         averages parameters and momentum here every exchange_freq steps)
    average(tensor)      the mean of a metrics tensor over all workers
    is_main              True for the one worker that logs and writes files
    close()
"""


class Local:
    """One worker: nothing to exchange."""
    is_main = True

    def after_step(self, step):
        pass

    def average(self, tensor):
        return tensor

    def close(self):
        pass
