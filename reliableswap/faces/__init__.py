"""Face detection, landmarks, alignment, masks and head pose.

Detection and dlib landmarks run on numpy images (dlib's own API); everything downstream
(alignment, masks, pose, paste-back) is batched torch code on any device.
"""
