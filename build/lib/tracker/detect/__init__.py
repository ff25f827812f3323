"""2D face landmarks: detectors chosen by name (mediapipe, dlib, fan), face-box tracking, cache."""

from tracker.detect.base import FaceBox, LandmarkDetector, Landmarks, LandmarkTrack, make_detector
from tracker.detect.sequence import detect_frames, detect_video

__all__ = ["FaceBox", "LandmarkDetector", "LandmarkTrack", "Landmarks", "detect_frames", "detect_video",
           "make_detector"]
