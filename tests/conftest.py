import torch

# The tests run tiny tensors; on 2 busy cores intra-op threads cost more than they give.
torch.set_num_threads(1)
