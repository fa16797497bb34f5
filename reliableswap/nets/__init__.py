"""Published face networks written in torch, each loading its authors' checkpoint key for key:
LIA and LivePortrait (reenactment), BiSeNet (face parsing), GFPGAN v1 clean and GPEN (restoration).
``weights`` says which files each needs, reads them without unpickling code and checks them."""
