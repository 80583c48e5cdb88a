#include "conv/sm90/conv2d_sm90.cuh"
FUSEDKERNELS_CONV2D_SM90_INSTANCE(__half)
