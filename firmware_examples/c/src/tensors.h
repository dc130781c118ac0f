/* Tensor sets (protocol section 5): {name: tag40([shape, tag86(bytes)])}, float64 only here.
 *
 * The C device trains softmax regression, so the model it takes is exactly {"W": [d, k],
 * "b": [k]} in float64. Anything else is refused with a reason the device sends as a decline.
 */
#ifndef EDGEFL_TENSORS_H
#define EDGEFL_TENSORS_H

#include <cbor.h>
#include <stddef.h>

#include "cbor_io.h"
#include "train.h"

#define TAG_NDARRAY 40
#define TAG_FLOAT64_LE 86

/* Decode a model blob into m (allocated here). Returns 0, or -1 with the reason in err. */
int tensors_decode_softmax(const uint8_t *blob, size_t len, softmax_model *m, char *err,
                           size_t errlen);
/* Append the tensor-set map {"W": ..., "b": ...} of m to o. */
void tensors_encode_softmax(cbor_out *o, const softmax_model *m);

#endif
